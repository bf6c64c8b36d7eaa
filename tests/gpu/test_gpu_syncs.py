"""The sync guard on a GPU: every hot loop runs a few real steps under CUDA's sync debug mode (igpt_ds.host_sync's
recorder in "warn" mode), and igpt-ds's own code may synchronise only where it says so (`host_sync.deliberate`:
log steps, stop checks, evaluation results, checkpoints, a finished batch leaving the device). DeepSpeed's own
syncs are counted apart and written to $OUT/gpu_syncs.md when bench/gpu_matrix.sh runs this.

    python -m pytest tests/gpu -m gpu -q

tests/test_host_sync.py runs the same loops on the CPU, where the recorder flags the calls that would synchronise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():  # before DeepSpeed is imported: the suite's conftest sets the CPU accelerator
    os.environ["DS_ACCELERATOR"] = "cuda"

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from eval_support import separable_shards, tiny_checkpoint  # noqa: E402
from pretrain_support import in_process_rank  # noqa: E402

from igpt_ds.config import ModelConfig, PretrainConfig, load_config  # noqa: E402
from igpt_ds.host_sync import SyncRecorder  # noqa: E402
from igpt_ds.models.igpt import IGPT  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPORTS: dict[str, str] = {}


@pytest.fixture(scope="module")
def rank():
    with in_process_rank(backend="nccl"):
        yield
    out = os.environ.get("OUT")
    if out and REPORTS:
        lines = ["# DeepSpeed's own host-device syncs in the hot loops (igpt-ds's: none allowed)", ""]
        lines += [f"## {name}\n\n```\n{report or '(none)'}\n```\n" for name, report in REPORTS.items()]
        Path(out, "gpu_syncs.md").write_text("\n".join(lines))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return separable_shards(tmp_path_factory.mktemp("gpu_syncs") / "shards")


def checked(name: str, rec: SyncRecorder) -> None:
    REPORTS[name] = rec.report()
    assert rec.cuda and rec.hot_entries > 0
    assert rec.ours() == [], "host-device syncs in a hot loop:\n" + rec.report()


PRETRAIN = {
    "zero1-ar": ["--train.ds_config=zero1_bf16"],
    "zero1-bert": ["--train.ds_config=zero1_bf16", "--model.objective=bert"],
    "zero3-ar": ["--train.ds_config=zero3_bf16"],
    "pipeline-ar": ["--train.ds_config=pipeline_zero1_bf16", "--train.layout=pipeline"],
    "pipeline-bert": ["--train.ds_config=pipeline_zero1_bf16", "--train.layout=pipeline", "--model.objective=bert"],
}


@pytest.mark.parametrize("layout", PRETRAIN)
def test_pretraining_syncs_only_where_it_means_to(layout, shards, tmp_path, rank):
    from igpt_ds.train.pretrain import train

    cfg = load_config(PretrainConfig, None, [
        "--model.size=igpt-tiny", "--model.n_px=8", "--model.n_vocab=8", f"--data.shards={shards}",
        f"--train.run_root={tmp_path}", "--train.global_batch=16", "--train.micro_batch=4", "--train.max_steps=6",
        "--train.log_every=3", "--train.eval_every=3", "--train.eval_batches=1", "--train.save_every=3",
        "--train.stop_check_every=3", "--train.probe_every=0", *PRETRAIN[layout]])  # fmt: skip
    with SyncRecorder() as rec:
        train(cfg)
    checked(f"pretraining {layout}", rec)


def test_fine_tuning_syncs_only_where_it_means_to(shards, tmp_path, rank):
    from igpt_ds.train.finetune import FinetuneConfig, finetune

    pretrained = tiny_checkpoint(tmp_path / "pretrained", n_vocab=8)
    cfg = load_config(FinetuneConfig, None, [
        f"--train.init_from={pretrained}", f"--data.shards={shards}", f"--train.run_root={tmp_path}",
        "--train.ds_config=zero1_bf16", "--train.global_batch=16", "--train.micro_batch=8", "--train.max_steps=6",
        "--train.log_every=3", "--train.eval_every=3", "--finetune.shift=1", "--finetune.standardize_features=true",
        "--finetune.stats_images=32"])  # fmt: skip
    with SyncRecorder() as rec:
        finetune(cfg)
    checked("fine-tuning zero1", rec)


def test_sampling_syncs_once_per_batch():
    from igpt_ds.eval.sampling import sample_images

    torch.manual_seed(0)
    model = IGPT(ModelConfig(size="igpt-tiny", n_px=8, n_vocab=16)).cuda().eval()
    torch.nn.init.normal_(model.lm_head.weight)
    with SyncRecorder() as rec:
        tokens = sample_images(model, range(4), seed=0, batch_size=2, top_k=4, precision="bf16")
    checked("sampling", rec)
    assert tokens.shape == (4, 64)


def test_feature_extraction_syncs_once_per_batch(shards, tmp_path):
    from igpt_ds.data.shards import ShardSplit
    from igpt_ds.eval.feature_store import prepare_split, split_plan
    from igpt_ds.eval.features import extract_parts

    split = ShardSplit(shards, "train")
    model = IGPT(ModelConfig(size="igpt-tiny", n_px=8, n_vocab=8, objective="bert"), seed=0).cuda().eval()
    plan = split_plan(split, [0, 2], 32, 16, {"test": "gpu"})
    prepare_split(tmp_path / "train", plan)
    with SyncRecorder() as rec:
        extract_parts(model, split, tmp_path / "train", plan, progress=False, bert_masks=2)
    checked("feature extraction", rec)
