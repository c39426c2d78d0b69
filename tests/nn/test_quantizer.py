"""The per-level codebook: nearest-code search, straight-through, EMA updates, restarts, DDP."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conchshell.nn.quantizer import NEAREST_BLOCK_ROWS, Bottleneck, CodebookQuantizer


def _quantizer(l_bins: int = 16, emb_width: int = 4, seed: int = 0) -> CodebookQuantizer:
    q = CodebookQuantizer(l_bins, emb_width)
    q.k.copy_(torch.randn(l_bins, emb_width, generator=torch.Generator().manual_seed(seed)))
    q.restore_statistics()
    return q


def _rows(latent: torch.Tensor) -> torch.Tensor:
    return latent.permute(0, 2, 1).reshape(-1, latent.shape[1])


def _is_some_row(vector: torch.Tensor, rows: torch.Tensor) -> bool:
    return bool((rows == vector).all(dim=1).any())


def test_quantize_is_nearest_neighbour():
    q = _quantizer()
    latent = torch.randn(2, 4, 50)
    codes = q.quantize(latent)
    expected = torch.cdist(_rows(latent), q.k).argmin(dim=1).view(2, 50)
    assert codes.dtype == torch.long and codes.shape == (2, 50)
    assert torch.equal(codes, expected)


def test_long_latents_are_searched_in_blocks_with_the_same_result():
    q = _quantizer(l_bins=64, emb_width=8)
    latent = torch.randn(2, 8, NEAREST_BLOCK_ROWS + 300)  # rows span three blocks
    expected = torch.cdist(_rows(latent), q.k).argmin(dim=1).view(2, -1)
    assert torch.equal(q.quantize(latent), expected)
    output = q(latent, update_codebook=False)
    torch.testing.assert_close(output.commit_loss, F.mse_loss(q.dequantize(expected), latent))


def test_ties_go_to_the_first_code():
    q = _quantizer(l_bins=8)
    q.k[5] = q.k[2]  # duplicate entry: both are at the same distance from everything
    latent = q.k[2].view(1, 4, 1).repeat(1, 1, 3)
    assert q.quantize(latent).tolist() == [[2, 2, 2]]


def test_dequantize_inverts_quantize_on_codebook_vectors():
    q = _quantizer()
    codes = torch.tensor([[3, 0, 15, 7], [1, 1, 2, 9]])
    latent = q.dequantize(codes)
    assert latent.shape == (2, 4, 4)
    assert torch.equal(latent[1, :, 3], q.k[9])
    assert torch.equal(q.quantize(latent), codes)


def test_straight_through_value_and_identity_gradient():
    q = _quantizer()
    latent = torch.randn(2, 4, 10, requires_grad=True)
    quantised, codes = q.straight_through(latent)
    assert torch.allclose(quantised, q.dequantize(codes), atol=1e-6)
    weight = torch.randn_like(quantised)
    (quantised * weight).sum().backward()
    assert torch.equal(latent.grad, weight)


def test_forward_commit_loss_and_eval_leaves_codebook_alone():
    q = _quantizer().eval()
    before = q.k.clone()
    latent = torch.randn(2, 4, 30, requires_grad=True)
    out = q(latent)
    assert torch.equal(q.k, before)
    assert torch.equal(out.codes, q.quantize(latent))
    expected = F.mse_loss(latent, q.dequantize(out.codes))
    assert torch.allclose(out.commit_loss, expected)
    assert {"fit", "pn", "entropy", "used_curr"} <= set(out.metrics)
    out.commit_loss.backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_first_training_batch_initialises_codebook_from_encoder_outputs():
    torch.manual_seed(0)
    q = CodebookQuantizer(16, 4, mu=1.0).train()  # mu=1 freezes the EMA: k stays at its init
    assert not q.initialised and not q.k.any()
    latent = torch.randn(2, 4, 20)  # 40 rows >= 16 codes: exact copies, no noise
    q(latent)
    assert q.initialised
    rows = _rows(latent)
    assert all(_is_some_row(code, rows) for code in q.k)
    assert len({tuple(r.tolist()) for r in q.k}) == 16  # distinct rows (random permutation)


def test_initialisation_with_fewer_rows_than_codes_tiles_with_small_noise():
    torch.manual_seed(0)
    q = CodebookQuantizer(64, 8)
    rows = torch.randn(5, 8)
    q._init_codebook(rows)
    nearest = torch.cdist(q.k, rows).min(dim=1).values
    assert nearest.max() < 0.05  # noise std is 0.01 / sqrt(8)
    assert len({tuple(r.tolist()) for r in q.k}) == 64


def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    q = _quantizer(l_bins=4, emb_width=2).train()
    q.k.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]]))
    q.restore_statistics(num_tokens=400)  # 100 expected uses per code: nobody is restarted
    latent = torch.tensor([[[0.5, 9.0, 0.2], [0.5, 1.0, 10.4]]])  # rows (0.5,.5), (9,1), (.2,10.4)
    q(latent)
    mu = q.mu
    expected = torch.tensor(
        [
            [(mu * 0 + (1 - mu) * 0.5) / (mu * 100 + (1 - mu)), (1 - mu) * 0.5 / (mu * 100 + (1 - mu))],
            [(mu * 1000 + (1 - mu) * 9.0) / (mu * 100 + (1 - mu)), (1 - mu) * 1.0 / (mu * 100 + (1 - mu))],
            [(1 - mu) * 0.2 / (mu * 100 + (1 - mu)), (mu * 1000 + (1 - mu) * 10.4) / (mu * 100 + (1 - mu))],
            [-10.0, -10.0],
        ]
    )
    assert torch.allclose(q.k, expected, atol=1e-5)
    assert torch.allclose(q.k_elem, torch.tensor([100 * mu + (1 - mu)] * 3 + [100 * mu]))


def test_dead_codes_are_restarted_at_encoder_outputs():
    torch.manual_seed(0)
    q = _quantizer(l_bins=8, emb_width=4).train()  # k_elem = 1: one missed step kills a code
    q.k[6] = 1e4  # never the nearest: dead
    latent = torch.randn(2, 4, 16)  # 32 rows >= 8 codes: restarts are exact rows
    out = q(latent)
    rows = _rows(latent)
    assert _is_some_row(q.k[6], rows)
    used = set(out.codes.flatten().tolist())
    for code in set(range(8)) - used:
        assert _is_some_row(q.k[code], rows)
    assert out.metrics["usage"] == len(used)
    assert out.metrics["dk"] > 0


def test_training_is_deterministic_given_the_torch_seed():
    latent = torch.randn(3, 4, 9)
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        q = CodebookQuantizer(32, 4).train()
        for _ in range(3):
            q(latent)
        results.append(q.k.clone())
    assert torch.equal(*results)


def test_state_dict_holds_only_the_codebook_and_restores_statistics():
    q = _quantizer(l_bins=8)
    assert list(q.state_dict()) == ["k"]
    fresh = CodebookQuantizer(8, 4)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialised
    assert torch.equal(fresh.k_sum, q.k) and torch.equal(fresh.k_elem, torch.ones(8))
    zeros = CodebookQuantizer(8, 4)
    zeros.load_state_dict({"k": torch.zeros(8, 4)})
    assert not zeros.initialised  # never-trained codebook: the first batch will initialise it


def test_bottleneck_names_match_checkpoint_layout():
    b = Bottleneck(levels=3, l_bins=8, emb_width=4)
    assert list(b.state_dict()) == [f"level_blocks.{i}.k" for i in range(3)]
    assert b[2] is b.level_blocks[2] and len(b) == 3


def test_training_needs_no_process_group(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed must not be used without a process group")

    monkeypatch.setattr(dist, "all_reduce", forbidden)
    monkeypatch.setattr(dist, "broadcast", forbidden)
    monkeypatch.setattr(dist, "get_rank", forbidden)
    q = CodebookQuantizer(8, 4).train()
    q(torch.randn(1, 4, 12))
    q(torch.randn(1, 4, 12))
    assert q.initialised


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_statistics_are_all_reduced_under_a_process_group(tmp_path, monkeypatch):
    calls = {"all_reduce": 0, "broadcast": 0}
    real_all_reduce, real_broadcast = dist.all_reduce, dist.broadcast

    def counting_all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return real_all_reduce(*args, **kwargs)

    def counting_broadcast(*args, **kwargs):
        calls["broadcast"] += 1
        return real_broadcast(*args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting_all_reduce)
    monkeypatch.setattr(dist, "broadcast", counting_broadcast)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    latent = torch.randn(1, 4, 12)
    try:
        torch.manual_seed(0)
        q = CodebookQuantizer(8, 4).train()
        q(latent)
        q(latent)
    finally:
        dist.destroy_process_group()
    # init: 1 broadcast; each update: 1 broadcast + 2 all-reduces (sums and counts).
    assert calls == {"all_reduce": 4, "broadcast": 3}
    torch.manual_seed(0)
    alone = CodebookQuantizer(8, 4).train()
    alone(latent)
    alone(latent)
    assert torch.equal(alone.k, q.k)  # world size 1: same result as no process group
