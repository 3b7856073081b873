"""Moved to `gossipfl.emulation` (the asynchrony model belongs to no engine); kept so that
``from gossipfl.sim.emulation import ...`` in existing scripts goes on working."""

from gossipfl.emulation import Emulation, parse_emulation

__all__ = ["Emulation", "parse_emulation"]
