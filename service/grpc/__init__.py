"""The KServe v2 ``GRPCInferenceService`` (tritonclient.grpc's protocol), beside HTTP.

``v2.proto`` is the protocol and ``v2_pb2.py`` its generated messages (checked in; see
``generate.py``); ``health.proto`` is the standard health check that Kubernetes probes ask.
``converters.py`` turns messages into the transport-free request and reply types of
``service.protocol.v2``, ``servicer.py`` answers each method by calling the same handlers as
the HTTP routes, and ``server.py`` runs it in the HTTP server's event loop, so both share the
models, their batchers and the metrics.
"""

import os

# grpc's fork handlers log a line at every fork while its threads run; the service forks only
# to exec (the ingest worker, a fresh interpreter), which needs none of them. Set before grpc
# is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
