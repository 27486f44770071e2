"""The Open Inference Protocol over HTTP/REST, served by the scoring process beside gRPC.

A thin adapter, as KServe and Triton serve both protocols from one server: `codec` turns
the HTTP bodies (JSON tensors, and Triton's binary tensor data extension) into the gRPC
messages and back; `server` runs them through the same servicer the gRPC server runs, so
batching, versions, caching, metrics and errors are the gRPC path's own.
"""
