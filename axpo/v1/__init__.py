"""Generated protobuf and gRPC code for the axpo.v1 contracts (scripts/gen_protos.sh)."""
