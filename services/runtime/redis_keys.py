"""The Redis key namespace every service's data lives under.

Features (`<root>:u:<id>`, `<root>:i:<id>`, ...) and ranking (`<root>:seen:<id>`) keep their
keys under one root so `infermesh seed` writes, and a deployment scopes (ACLs, key
prefixes), one namespace; each service owns the layout of its own keys beneath it.
"""

DEFAULT_NAMESPACE = "infermesh:v1"
