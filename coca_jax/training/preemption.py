"""Stopping early on a preemption notice, at the same step on every process.

A scheduler announces the end of a run with SIGTERM: SLURM before the time limit
(`--signal=TERM@120`), a spot VM or a TPU maintenance event before it goes away, `kill`. The train
loop then saves a checkpoint at the current step and exits cleanly, and a re-run resumes.

With several processes the notice may reach one host only, and every host must still stop after
the SAME step: a host that stops alone leaves the others blocked in the next step's collectives
and the checkpoint half written. So a multi-process run does not decide in a Python signal
handler. `jax.distributed.initialize` starts JAX's preemption sync manager, which catches SIGTERM
on whichever host gets it, tells the others through the coordination service, and agrees on one
step (one past the largest step any host has reached); orbax's `manager.reached_preemption(step)`
turns true at that step on every host. The loop asks at every step, which the protocol requires.
"""

from __future__ import annotations

import os
import signal

from absl import logging
import jax
import orbax.checkpoint as ocp


class StopSignal:
  """`reached(step)` is True once the run should checkpoint and stop after `step`.

  One process: SIGTERM or SIGINT sets a flag. Several processes: SIGTERM is left to JAX's
  preemption sync manager (a Python handler would replace its C++ one), and SIGINT (Ctrl-C,
  which a terminal sends to every local process, each at its own step) is re-sent as SIGTERM so
  that it takes the same agreed path.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.multiprocess = jax.process_count() > 1
    self.requested = False
    if self.multiprocess:
      signal.signal(signal.SIGINT, self._forward_as_sigterm)
    else:
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, self._request)

  def _request(self, signum, frame):
    del frame
    logging.warning("Received signal %d: checkpointing and stopping after this step", signum)
    self.requested = True

  def _forward_as_sigterm(self, signum, frame):
    del signum, frame
    os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self.multiprocess:
      return self.manager.reached_preemption(step)
    return self.requested
