import json

import numpy as np
import polars as pl
import pytest
import torch

from ncf.checkpoint import load_model_dir, model_from_state, model_state, save_model_dir
from ncf.models import GMF, MLP, ModelConfig, NeuMF, build_model, tower_layers


def _pretrained(seed=0):
    torch.manual_seed(seed)
    gmf = GMF(ModelConfig("gmf", 13, 17))
    mlp = MLP(ModelConfig("mlp", 13, 17))
    for p in list(gmf.parameters()) + list(mlp.parameters()):  # make every value distinct
        with torch.no_grad():
            p.normal_()
    return gmf, mlp


def test_tower_halves():
    assert tower_layers(8) == (64, 32, 16, 8)
    assert tower_layers(16, 2) == (64, 32, 16)
    mlp = MLP(ModelConfig("mlp", 3, 3, layers=tower_layers(8)))
    assert [(lin.in_features, lin.out_features) for lin in mlp.tower.linears] == [(64, 32), (32, 16), (16, 8)]
    assert mlp.mlp_embedding.users.shape == (3, 32)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_neumf_from_pretrained_copies_exactly(alpha):
    gmf, mlp = _pretrained()
    neumf = NeuMF.from_pretrained(gmf, mlp, alpha)
    assert torch.equal(neumf.user_gmf.weight, gmf.user_gmf.weight)
    assert torch.equal(neumf.item_gmf.weight, gmf.item_gmf.weight)
    assert torch.equal(neumf.mlp_embedding.weight, mlp.mlp_embedding.weight)
    for a, b in zip(neumf.tower.linears, mlp.tower.linears):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    h = torch.cat([alpha * gmf.h.weight, (1 - alpha) * mlp.h.weight], dim=1)
    assert torch.equal(neumf.h.weight, h)
    assert torch.equal(neumf.h.bias, alpha * gmf.h.bias + (1 - alpha) * mlp.h.bias)
    # and hence the initial NeuMF logit is the alpha-blend of the two pre-trained logits
    u, i = torch.arange(13).repeat(17), torch.arange(17).repeat_interleave(13)
    with torch.no_grad():
        blend = alpha * gmf(u, i) + (1 - alpha) * mlp(u, i)
        assert torch.allclose(neumf(u, i), blend, atol=1e-5)


def test_fused_model_is_section_3_4_formula():
    m = build_model(ModelConfig("fused", 4, 5, factors=3))
    u, i = torch.tensor([1, 2]), torch.tensor([0, 4])
    p, q = m.user_emb.weight[u], m.item_emb.weight[i]
    expected = m.h(torch.relu(p * q + torch.cat([p, q], -1) @ m.linear.weight.T + m.linear.bias)).squeeze(-1)
    assert torch.allclose(m(u, i), expected)


def test_checkpoint_round_trip_weights_only(tmp_path):
    gmf, mlp = _pretrained(1)
    neumf = NeuMF.from_pretrained(gmf, mlp)
    save_model_dir(tmp_path / "m", neumf, user_ids=pl.Series(list(range(100, 113))),
                   item_ids=pl.Series([f"i{k}" for k in range(17)]),
                   seen_users=np.array([0, 1]), seen_items=np.array([3, 4]))
    raw = torch.load(tmp_path / "m" / "weights.pt", map_location="cpu", weights_only=True)
    assert raw["config"]["kind"] == "neumf"
    md = load_model_dir(tmp_path / "m")
    for (k, a), (_, b) in zip(neumf.state_dict().items(), md.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert md.user_ids.dtype == pl.Int64 and md.item_ids.dtype == pl.String
    assert md.item_ids[3] == "i3" and md.seen_items.tolist() == [3, 4]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left
    assert torch.equal(model_from_state(model_state(neumf)).h.weight, neumf.h.weight)


def test_row_lookup_gradient_equals_embedding_gradient():
    """_rows (index_select forward, one index_add_ backward) against nn.Embedding, with
    repeated indices and the strided gradient that torch.cat's backward produces."""
    from ncf.models import _rows

    torch.manual_seed(0)
    emb = torch.nn.Embedding(7, 4)
    ref = torch.nn.Embedding(7, 4)
    ref.load_state_dict(emb.state_dict())
    idx = torch.tensor([[3, 1, 3], [6, 3, 0]])
    other = torch.randn(2, 3, 2, requires_grad=True)
    up = torch.randn(2, 3, 6)
    out = torch.cat([_rows(emb, idx), other], dim=-1)
    (out * up).sum().backward()
    (torch.cat([ref(idx), other.detach()], dim=-1) * up).sum().backward()
    assert torch.equal(_rows(emb, idx), ref(idx))
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad, rtol=0, atol=1e-6)
    assert emb.weight.grad[[2, 4, 5]].abs().sum() == 0 and emb.weight.grad[3].abs().sum() > 0


def test_pair_embedding_equals_two_tables_and_cat():
    """One stacked table read once per pair: the same rows and the same gradients as a
    user table and an item table joined by torch.cat (repeated users and items included)."""
    from ncf.models import PairEmbedding

    torch.manual_seed(0)
    pair = PairEmbedding(5, 7, 3)
    users_ref = torch.nn.Embedding(5, 3, _weight=pair.users.detach().clone())
    items_ref = torch.nn.Embedding(7, 3, _weight=pair.items.detach().clone())
    u = torch.tensor([[4, 1, 4], [0, 4, 2]])
    i = torch.tensor([[6, 6, 0], [3, 5, 6]])
    up = torch.randn(2, 3, 6)
    ref = torch.cat([users_ref(u), items_ref(i)], dim=-1)
    assert torch.equal(pair(u, i), ref)
    (pair(u, i) * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(pair.weight.grad, torch.cat([users_ref.weight.grad, items_ref.weight.grad]),
                               rtol=0, atol=1e-6)
    assert pair.weight.grad[3].abs().sum() == 0 and pair.weight.grad[5 + 6].abs().sum() > 0


def test_format_1_checkpoint_still_loads(tmp_path):
    """Format 1 stored the MLP embeddings as two tables; they load into the stacked one."""
    gmf, mlp = _pretrained(2)
    neumf = NeuMF.from_pretrained(gmf, mlp)
    save_model_dir(tmp_path / "m", neumf, user_ids=pl.Series(list(range(13))), item_ids=pl.Series(list(range(17))),
                   seen_users=np.array([0]), seen_items=np.array([3]))
    raw = torch.load(tmp_path / "m" / "weights.pt", map_location="cpu", weights_only=True)
    sd = dict(raw["state_dict"])
    stacked = sd.pop("mlp_embedding.weight")
    sd["user_mlp.weight"], sd["item_mlp.weight"] = stacked[:13].clone(), stacked[13:].clone()
    torch.save({**raw, "format_version": 1, "state_dict": sd}, tmp_path / "m" / "weights.pt")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    loaded = load_model_dir(tmp_path / "m").model
    for (k, a), (_, b) in zip(neumf.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_warmup_ramps_the_learning_rate_over_the_first_epoch():
    """train_epoch(warmup=True): step b uses lr * (1/8 + 7/8 * b / (n_batches - 1)); the
    optimizer's rate is restored afterwards; without warmup every step uses lr."""
    from ncf.train import WARMUP_DIVISOR, train_epoch

    torch.manual_seed(0)
    model = GMF(ModelConfig("gmf", 10, 12))
    opt = torch.optim.Adam(model.parameters(), lr=0.008)
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    users, items = torch.randint(0, 10, (50,)), torch.randint(0, 12, (50,))
    labels = (torch.rand(50) < 0.3).float()
    train_epoch(model, opt, users, items, labels, batch_size=10, warmup=True)
    assert WARMUP_DIVISOR == 8
    assert seen == pytest.approx([0.008 * (1 / 8 + 7 / 8 * b / 4) for b in range(5)], rel=1e-12)
    assert seen[0] == pytest.approx(0.001) and seen[-1] == pytest.approx(0.008)
    assert opt.param_groups[0]["lr"] == 0.008
    seen.clear()
    train_epoch(model, opt, users, items, labels, batch_size=10)
    assert seen == [0.008] * 5
