"""Test infrastructure that starts real components: the NAT lab (network namespaces, iptables NATs,
coturn) and a standalone WebRTC link probe that runs inside it."""
