"""The drift monitor: sampled infer requests through each model's observer graph, in a process
of the monitor's own, off the request path.

One module a responsibility:

- ``monitor``: the server's side: the coin flip on the request path, the bounded list of
  samples, the sender and receiver threads, the process's lifecycle and calls into it
- ``process``: the monitor's process: its main loop and the messages it takes and sends
- ``windows``: per model, the observer session, the window of sampled rows, its score and the
  kept samples (no transport, no threads)
"""

from service.drift.monitor import GATHER_S, DriftMonitor, DriftUnavailable, MonitorUnavailable

__all__ = ["GATHER_S", "DriftMonitor", "DriftUnavailable", "MonitorUnavailable"]
