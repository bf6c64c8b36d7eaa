"""The training loop's data path and stop flag, in one process: keyed BERT masks, the read-ahead
StepReader, the stop agreement every train.stop_check_every steps."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from igpt_ds.data.prefetch import StepReader
from igpt_ds.data.sampler import GlobalBatchSampler
from igpt_ds.distributed.stop import StopSignal
from igpt_ds.models.objectives import keyed_bert_masks


def test_keyed_masks_depend_only_on_the_key():
    masks = keyed_bert_masks(0, 0, 7, np.arange(16), 1024, 0.15)
    assert masks.shape == (16, 1024) and masks.dtype == torch.bool
    assert len(set(masks.sum(dim=1).tolist())) > 1  # a Bernoulli draw per position: counts vary by image
    exact = keyed_bert_masks(0, 0, 7, np.arange(16), 1024, 0.15, kind="exact")
    assert (exact.sum(dim=1) == round(0.15 * 1024)).all()
    # A sample's mask is the same in any batch: other neighbours, other order, alone.
    alone = keyed_bert_masks(0, 0, 7, np.array([5]), 1024, 0.15)
    shuffled = keyed_bert_masks(0, 0, 7, np.array([9, 5, 3]), 1024, 0.15)
    assert torch.equal(alone[0], masks[5]) and torch.equal(shuffled[1], masks[5])
    # Every part of the key matters: seed, stream (train/val), step, sample.
    for other in ((1, 0, 7, 5), (0, 1, 7, 5), (0, 0, 8, 5), (0, 0, 7, 6)):
        assert not torch.equal(keyed_bert_masks(*other[:3], np.array([other[3]]), 1024, 0.15)[0], masks[5]), other
    # Positions are chosen uniformly: over many samples every position is masked about 15% of the time.
    rate = keyed_bert_masks(3, 0, 0, np.arange(4000), 64, 0.25).float().mean(dim=0)
    assert rate.min() > 0.2 and rate.max() < 0.3


class RecordingRead:
    """A read function that records the sampler positions it was asked for and returns the indices."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []  # (first index, step)
        self.epochs: list[np.ndarray] = []

    def __call__(self, indices: np.ndarray, epochs: np.ndarray, step: int) -> list[np.ndarray]:
        self.calls.append((int(indices[0]), step))
        self.epochs.append(epochs)
        return [indices]


def test_step_reader_gives_the_sampler_sequence_and_reads_one_step_ahead():
    def sampler() -> GlobalBatchSampler:
        return GlobalBatchSampler(50, 8, dp_rank=1, dp_size=2, seed=3)

    read, reference = RecordingRead(), sampler()
    reader = StepReader(read, sampler())
    try:
        for step in range(10):  # crosses the epoch boundary (50 samples, 8 a step)
            (got,) = reader.take(step)
            np.testing.assert_array_equal(read.epochs[step], (reference.consumed + 4 + np.arange(4)) // 50)
            np.testing.assert_array_equal(got, reference.next_indices())
            assert reader.sampler.consumed == reference.consumed  # a checkpoint sees exactly the steps taken
        position, ahead = reader.ahead  # the step after the last one taken, read in the background
        ahead.result(timeout=5)
        assert position == reference.consumed and read.calls[-1][1] == 10 and len(read.calls) == 11
    finally:
        reader.close()


def test_step_reader_rereads_when_the_sampler_moved():
    """A sampler restored from a checkpoint (a new position) makes the read-ahead stale: it is not used."""
    read = RecordingRead()
    reader = StepReader(read, GlobalBatchSampler(100, 10, 0, 1, seed=0, shuffle=False))
    try:
        (first,) = reader.take(0)
        reader.sampler.load_state_dict({"consumed": 60})
        (moved,) = reader.take(6)
        np.testing.assert_array_equal(first, np.arange(10))
        np.testing.assert_array_equal(moved, np.arange(60, 70))
    finally:
        reader.close()


def test_step_reader_passes_a_read_error_to_the_loop():
    def failing(indices, epochs, step):
        raise OSError("shard unreadable")

    reader = StepReader(failing, GlobalBatchSampler(10, 2, 0, 1, seed=0))
    try:
        with pytest.raises(OSError, match="shard unreadable"):
            reader.take(0)
    finally:
        reader.close()


def test_stop_signal_is_decided_at_check_steps_only(one_rank_group):
    for sig in StopSignal.SIGNALS:  # as from a terminal, however the suite was started (one_rank_group restores)
        signal.signal(sig, signal.SIG_DFL)
    stop = StopSignal(every=5)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)
    assert stop.received == [signal.SIGUSR1]
    assert [stop.check(step).signal for step in range(1, 6)] == [0, 0, 0, 0, signal.SIGUSR1]  # only step 5 communicates
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert stop.check(10).signal == signal.SIGTERM  # the largest signal number received wins, on every rank alike
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for a checkpoint
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)


def test_a_signal_the_process_was_started_ignoring_stays_ignored(one_rank_group):
    """`cmd &` in a script starts cmd ignoring SIGINT (and `nohup` SIGHUP): such a run ignores it, as any Python
    program does; the other stop signals still act."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop = StopSignal(every=1)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert stop.check(1).signal == 0
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert stop.check(2).signal == signal.SIGTERM
