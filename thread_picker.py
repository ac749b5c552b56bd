"""The faster of one CPU thread and all of them, chosen while a loop runs.

Two threads win on a quiet 2-core machine and lose badly (up to several times
slower) when another process, or another tenant of the VM, holds a core: each
parallel op ends with the threads waiting for each other. Such neighbours come
and go within a minute, so the choice is timed on the loop's own steps and
watched, not fixed at the start. `vae_stack` picks per VAE training step and
`extract_features` per batch of images; in both, every kernel rounds the same on
any thread count (tests check it), so the choice changes no number.
"""
import time

import torch


class ThreadPicker:
    """Time ``probe`` steps on each candidate count (1 and torch's count), run on
    the faster, and when a window of ``window`` steps runs ``drift`` times slower
    or faster than the chosen count did, time both again.

    ``threads`` fixes the count (no picking); so does a non-CPU device, whose
    kernels do not run on these threads.
    """

    def __init__(self, threads, device, probe=16, window=32, drift=1.5):
        self.initial = torch.get_num_threads()
        fixed = threads or (self.initial if device.type != "cpu" else None)
        self.candidates = [fixed] if fixed else sorted({1, self.initial})
        self.probe, self.window, self.drift = probe, window, drift
        self.chosen = []    # per schedule() call: the count that ran most of its steps

    def _timed(self, count, step, n):
        """Run steps [step, step + n) on ``count`` threads; yields them, returns s/step."""
        torch.set_num_threads(count)
        start = time.perf_counter()
        for index in range(step, step + n):
            yield index
        return (time.perf_counter() - start) / n

    def schedule(self, steps):
        """Yield the step indices 0 .. steps-1, setting the thread count for each."""
        used = dict.fromkeys(self.candidates, 0)
        best, reference, step = self.candidates[0], None, 0   # too short to time: one thread
        while step < steps:
            if reference is None and len(self.candidates) > 1 and steps - step >= 4 * self.probe:
                timings = {}
                for count in self.candidates:
                    timings[count] = yield from self._timed(count, step, self.probe)
                    used[count] += self.probe
                    step += self.probe
                best = min(timings, key=timings.get)
                reference = timings[best]
            n = min(self.window, steps - step)
            per_step = yield from self._timed(best, step, n)
            used[best] += n
            step += n
            if reference is not None and not reference / self.drift <= per_step <= reference * self.drift:
                reference = None      # the machine changed: time both again
        self.chosen.append(max(used, key=used.get))

    def restore(self):
        torch.set_num_threads(self.initial)
