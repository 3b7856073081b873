"""Engines that run many nodes on one host."""
