import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spineseg.bench import blob_tokens
from spineseg.models import Critic, build_model, model_names
from spineseg.models.attention import clustered_attention, kmeans_assign, naive_attention
from spineseg.train.losses import SegLoss, critic_loss, gradient_penalty, one_hot


def test_clustered_equals_full_attention_when_every_query_is_its_own_cluster():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8) for _ in range(3))
    out = clustered_attention(q, k, v, clusters=50)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, ref, atol=1e-5)


def test_clustered_attention_gradcheck():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assign = kmeans_assign(q, 4)  # fixed assignment: the function is then smooth in q, k, v
    assert torch.autograd.gradcheck(lambda a, b, c: clustered_attention(a, b, c, 4, assign=assign), (q, k, v))


def test_gradients_reach_input_and_attention_weights():
    from spineseg.models.attention import TransformerBlock2d

    blk = TransformerBlock2d(16, heads=4, mode="clustered", clusters=8)
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    blk(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert blk.attn.qkv.weight.grad.abs().sum() > 0


def test_clustered_close_to_full_on_blob_tokens():
    q, k, v = blob_tokens(2048, seed=3)
    out = clustered_attention(q, k, v, clusters=100)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert float((out - ref).norm() / ref.norm()) < 0.25
    # and the naive reference agrees with SDPA
    assert torch.allclose(naive_attention(q[..., :256, :], k[..., :256, :], v[..., :256, :]),
                          F.scaled_dot_product_attention(q[..., :256, :], k[..., :256, :], v[..., :256, :]), atol=1e-5)


def test_kmeans_is_deterministic_and_groups_blobs():
    q, _, _ = blob_tokens(1000, seed=4)
    a1, a2 = kmeans_assign(q, 8), kmeans_assign(q, 8)
    assert torch.equal(a1, a2)
    assert a1.min() >= 0 and a1.max() < 8


@pytest.mark.parametrize("name", model_names())
def test_every_registry_name_maps_64_to_64(name):
    m = build_model(name, base=8, clusters=16)
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_registry_rows_differ_as_the_paper_says():
    from spineseg.models.registry import ARCHITECTURES as A

    assert A["unet"]["attention"] == "none" and A["unet_tm"]["attention"] == "full"
    assert A["unet_ctm"]["attention"] == A["resunet_ctm_dconv"]["attention"] == "clustered"
    assert A["unet_res"]["block"] == "residual" and A["unet"]["block"] == "plain"
    assert tuple(A["resunet_ctm_dconv"]["dilations"]) == (1, 2, 4, 8) and tuple(A["unet_res_ctm"]["dilations"]) == (1, 1, 1, 1)


def test_one_step_lowers_supervised_loss():
    torch.manual_seed(0)
    m = build_model("resunet_ctm_dconv", base=8, clusters=16)
    x = torch.randn(2, 1, 64, 64)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 10:30, 10:30] = 1
    y[:, 35:45, 20:40] = 2
    y[:, 50:55, 5:60] = 3
    loss_fn = SegLoss()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    before = loss_fn(m(x), y).item()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(m(x), y).backward()
        opt.step()
    assert loss_fn(m(x), y).item() < before


def test_gradient_penalty_finite_and_positive():
    torch.manual_seed(0)
    c = Critic(5, base=8)
    img = torch.randn(2, 1, 64, 64)
    real = one_hot(torch.randint(0, 4, (2, 64, 64)), 4)
    fake = torch.softmax(torch.randn(2, 4, 64, 64), 1)
    gp = gradient_penalty(c, img, real, fake)
    assert torch.isfinite(gp) and gp > 0
    for mode in ("wgan-gp", "wgan", "bce"):
        assert torch.isfinite(critic_loss(mode, c, img, real, fake))


def test_critic_refuses_batch_norm():
    from spineseg.models.critic import Critic

    with pytest.raises(ValueError):
        Critic(5, norm="batch")
