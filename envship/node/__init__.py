"""The node side: runs in the nannies of each node.

The handlers and plugin of a nanny, its worker process inside an
environment, and the node cache that unpacks each environment once.
"""
