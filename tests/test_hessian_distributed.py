import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from hessian_ranks import problem, run, shares


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    output = tmp_path / "ranks.pt"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(Path(__file__).parent / "hessian_ranks.py"), str(output)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = torch.load(output, weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, x, y = problem()
        same_batches = run(model, [batch for share in shares(x, y) for batch in share])
        one_batch = run(model, [(x, y)])
    finally:
        torch.set_num_threads(threads)

    assert ranks["num_samples"] == 45
    # The same two weighted batch products, summed in the same order: equal to the last bit.
    for key in ("blocks", "iterations", "verify", "top", "trace"):
        assert torch.equal(ranks[key], same_batches[key]), key
    # One full batch sums in another order, so the numbers agree to rounding only.
    for key in ("blocks", "verify", "top", "trace"):
        torch.testing.assert_close(ranks[key], one_batch[key], rtol=1e-9, atol=1e-12)
