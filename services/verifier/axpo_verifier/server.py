"""gRPC front of the verifier: the only module of the service that touches gRPC.

``axpo serve verifier`` runs :func:`serve`. Each request is converted to domain types item by
item, so one unusable item (no kind, a negative tolerance) gets a zero reward naming the field
and the rest of the batch is scored as usual.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from axpo.contracts import convert
from axpo.contracts.domain import Reward, ScoreItem
from axpo.rpc.server import RunningServer, ServiceRegistration, serve_forever, start_server
from axpo.settings.verifier import VerifierSettings
from axpo.telemetry.logs import configure_logging, get_logger
from axpo.v1 import verifier_pb2, verifier_pb2_grpc
from axpo_verifier.verifier import Verifier

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name
log = get_logger("axpo.verifier")


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, verifier: Verifier, settings: VerifierSettings) -> None:
        self._verifier = verifier
        self._settings = settings

    def Score(
        self, request: verifier_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> verifier_pb2.ScoreResponse:
        weights = convert.reward_weights_from_proto(request.weights, self._settings.reward_weights)
        items: list[ScoreItem] = []
        positions: list[int] = []
        rewards: list[Reward | None] = [None] * len(request.items)
        for i, msg in enumerate(request.items):
            try:
                items.append(convert.score_item_from_proto(msg))
                positions.append(i)
            except ValueError as exc:
                rewards[i] = Reward.zero(f"bad item: {exc}")
        for i, reward in zip(positions, self._verifier.score(items, weights), strict=True):
            rewards[i] = reward
        return verifier_pb2.ScoreResponse(
            results=[
                verifier_pb2.ScoredItem(item_id=msg.item_id, reward=convert.reward_to_proto(r))
                for msg, r in zip(request.items, rewards, strict=True)
                if r is not None
            ]
        )


def start(settings: VerifierSettings, verifier: Verifier) -> RunningServer:
    """Start the service (non-blocking); the caller owns ``verifier`` and stops the server."""
    servicer = VerifierServicer(verifier, settings)
    registration = ServiceRegistration(
        name=SERVICE_NAME,
        add=lambda server: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(
            servicer, server
        ),
    )
    return start_server([registration], settings.rpc, service="verifier")


def serve(settings: VerifierSettings, port_file: Path | None = None) -> None:
    """Run the verifier until SIGTERM/SIGINT. Writes the bound port to ``port_file`` if given."""
    configure_logging(settings.log, service="verifier")
    with Verifier(settings) as verifier:
        running = start(settings, verifier)
        if port_file is not None:
            port_file.write_text(f"{running.port}\n")
        serve_forever(running, settings.rpc.grace_s)
