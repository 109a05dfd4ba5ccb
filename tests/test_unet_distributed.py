"""unet_ext.UNet under DistributedDataParallel (gloo, two CPU processes) and CPU bf16 autocast."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import unet_ext


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 44, 44, generator=gen)
    target = torch.randint(0, 2, (4, 4, 4), generator=gen)
    weight = torch.rand(4, 4, 4, generator=gen) + 0.5
    return x, target, weight


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(unet_ext.UNet(base_channels=4, depth=2))
    x, target, weight = _batch()
    shard = slice(rank * 2, rank * 2 + 2)  # each process takes half of the batch
    loss = unet_ext.weighted_cross_entropy(model(x[shard]), target[shard], weight[shard])
    loss.backward()
    if rank == 0:
        queue.put([p.grad.numpy().copy() for p in model.parameters()])  # by value, not shared memory
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    grads = [torch.from_numpy(g) for g in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    torch.manual_seed(0)
    model = unet_ext.UNet(base_channels=4, depth=2)
    x, target, weight = _batch()
    # DDP averages the per-process gradients; each process's loss is the mean over its half.
    halves = [unet_ext.weighted_cross_entropy(model(x[i:i + 2]), target[i:i + 2], weight[i:i + 2])
              for i in (0, 2)]
    (sum(halves) / 2).backward()
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


def test_cpu_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = unet_ext.UNet(base_channels=4, depth=2)
    x, target, weight = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = unet_ext.weighted_cross_entropy(logits.float(), target, weight)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
