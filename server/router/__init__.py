"""Replicas behind one address: the prefix-affinity policy and the proxy."""
