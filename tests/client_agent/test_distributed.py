"""client-agent --gpus N: DistributedDataParallel over N processes gives the one-process update (gloo on CPUs)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from client_agent.cli import EXIT_BAD_INPUT, main as agent_main
from client_agent.data import build_datasets
from client_agent.distributed import ShardedOrder, check_gpus, train_distributed
from client_agent.training import LoopSettings, TrainingError, train_local
from model import DiceCELoss, build_model

SIZE = 16


def test_sharded_order_splits_each_global_batch_between_ranks() -> None:
    single = list(ShardedOrder(5, per_rank_batch=4, world_size=1, rank=0, seed=3))
    ranks = [list(ShardedOrder(5, per_rank_batch=2, world_size=2, rank=r, seed=3)) for r in (0, 1)]

    assert sorted(single[:5]) == [0, 1, 2, 3, 4] and len(single) == 8  # padded to two global batches
    assert single == ranks[0][:2] + ranks[1][:2] + ranks[0][2:] + ranks[1][2:]
    sampler = ShardedOrder(5, per_rank_batch=4, world_size=1, rank=0, seed=3)
    assert list(sampler) != list(sampler)  # a new order each epoch


@pytest.mark.slow
def test_two_processes_give_the_single_process_update(mni_site: Path, tmp_path: Path) -> None:
    data = build_datasets(mni_site, spatial_size=(SIZE,) * 3, num_classes=4, val_fraction=0.34, augment=False)
    torch.manual_seed(0)
    net = build_model("transformer_unet", in_channels=1, out_channels=4, img_size=[SIZE] * 3, channels=[4, 8],
                      num_transformer_layers=1, num_heads=2)
    loop = LoopSettings(epochs=2, lr=0.05, optimizer="sgd", momentum=0.9)
    loss_fn = DiceCELoss(lambda_dice=0.5)
    single, parallel = copy.deepcopy(net), copy.deepcopy(net)

    order = ShardedOrder(len(data.train), per_rank_batch=2, world_size=1, rank=0, seed=11)
    train_local(single, DataLoader(data.train, batch_size=2, sampler=order), loop, device="cpu", loss_fn=loss_fn)
    result = train_distributed(parallel, data.train, loop, processes=2, batch_size=1, seed=11, loss_fn=loss_fn,
                               device_type="cpu", work_dir=tmp_path)

    moved = max(float((a - b).abs().max()) for a, b in zip(single.state_dict().values(), net.state_dict().values()))
    assert moved > 1e-3  # training really changed the weights
    for name, expected in single.state_dict().items():
        torch.testing.assert_close(parallel.state_dict()[name], expected, atol=1e-5, rtol=1e-4, msg=name)
    assert result.steps == 2 and result.volumes == 2 * 2  # 2 training cases: one global batch per epoch
    assert list(tmp_path.iterdir()) == []  # rendezvous and weights cleaned up


def test_more_gpus_than_exist_is_a_clear_error(mni_site: Path, tmp_path: Path, capsys) -> None:
    count = torch.cuda.device_count()
    asked = max(2, count + 1)  # --gpus 1 means one device as --device says, GPU or not
    with pytest.raises(TrainingError, match=f"--gpus {asked}: this machine has {count} CUDA GPU"):
        check_gpus(asked, "cuda")

    code = agent_main(["--data", str(mni_site), "--aggregator", "127.0.0.1:9", "--site", "site-a",
                       "--state-dir", str(tmp_path / "state"), "--gpus", str(asked)])

    assert code == EXIT_BAD_INPUT
    assert f"this machine has {count} CUDA GPU" in capsys.readouterr().err
