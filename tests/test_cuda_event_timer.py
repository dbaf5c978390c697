"""The one CUDA-event timing loop (adaskip._util.cuda_event_seconds), checked on the CPU with
events that read a fake device clock."""
import torch

from adaskip._util import cuda_event_seconds


class _Clock:
    def __init__(self):
        self.ms, self.calls, self.waits = 0.0, [], 0


def _fake_cuda(monkeypatch) -> _Clock:
    clock = _Clock()

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = clock.ms

        def synchronize(self):
            clock.waits += 1

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    return clock


def test_each_call_is_timed_per_call_with_its_untimed_preparation(monkeypatch):
    clock = _fake_cuda(monkeypatch)

    def before():  # untimed: the clock moves, the sample does not see it
        clock.calls.append("before")
        clock.ms += 100.0

    def run():
        clock.calls.append("run")
        clock.ms += 6.0

    times = cuda_event_seconds(run, 3, before=before, per_call=2)
    assert times == [0.003, 0.003, 0.003]  # 6 ms over 2 calls, in seconds
    assert clock.calls == ["before", "run"] * 3 and clock.waits == 3


def test_back_to_back_calls_are_not_waited_for(monkeypatch):
    clock = _fake_cuda(monkeypatch)

    def run():
        clock.ms += 2.0

    assert cuda_event_seconds(run, 4, back_to_back=True) == [0.002] * 4
    assert clock.waits == 0
