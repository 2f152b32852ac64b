"""The ingest worker: ``python -m service.worker LIMITS_JSON JOB_DIR``, one job per process.

The server (``service.ingest``) writes ``job.json`` and ``upload`` into a scratch directory and
runs this package on it in a fresh process, so that a model that crashes onnxruntime or torch
takes down only that process. The worker sets its resource limits before any user byte is
read, runs the job and writes ``result.json`` (a status and the reports) and, on success,
``folded.onnx`` and ``original.onnx``.

One module a responsibility:

- ``sandbox``: resource limits, staged imports, the refusal every job raises
- ``parsing``: uploaded bytes to an ONNX graph or a state dict, never unpickled
- ``sources``: where the original graph comes from (an ONNX upload, a zoo model, an
  architecture with uploaded weights)
- ``fold_job``: fold, verify, load-test and write the graph to serve
- ``savings``: what folding saved, measured
"""
