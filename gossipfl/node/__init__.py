"""The node service: one learner that serves HTTP, trains, gossips and tracks its peers."""

from gossipfl.node.clock import Clock, VirtualClock, WallClock
from gossipfl.node.node import Node
from gossipfl.node.transport import HttpTransport, MemoryNetwork, Transport

__all__ = ["Clock", "HttpTransport", "MemoryNetwork", "Node", "Transport", "VirtualClock", "WallClock"]
