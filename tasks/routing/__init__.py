"""Routing: the strategies that pick a node, the node registry, and the route task."""
