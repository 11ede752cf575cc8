"""What crosses a boundary, in one place.

- :mod:`~axpo.contracts.domain`: the domain types (frozen dataclasses) the code works with.
- :mod:`~axpo.contracts.convert`: one ``*_to_proto``/``*_from_proto`` pair per type, between
  them and the wire types generated from ``protos/`` into :mod:`axpo.v1`.
- :mod:`~axpo.contracts.chat`: the Qwen3-VL-Thinking conversation format (thinking, tool
  calls, tool responses) as exact strings, so the tiny model and real checkpoints share it.
"""
