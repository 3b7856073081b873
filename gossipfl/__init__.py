"""gossipfl: asynchronous peer-to-peer gossip learning."""
