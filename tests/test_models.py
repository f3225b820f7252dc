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


@pytest.mark.parametrize("seed,blobs", [(4, 8), (5, 6), (6, 8)])
def test_kmeans_is_deterministic_and_groups_blobs(seed, blobs):
    from sklearn.metrics import adjusted_rand_score

    q, _, _, ids = blob_tokens(1000, seed=seed, blobs=blobs, with_ids=True)
    a1, a2 = kmeans_assign(q, blobs), kmeans_assign(q, blobs)
    assert torch.equal(a1, a2)
    for h in range(q.shape[1]):  # every head: the clusters are the blobs
        assert adjusted_rand_score(ids[h].numpy(), a1[0, h].numpy()) >= 0.9, h


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cluster_sums_and_counts_accumulate_in_float32(monkeypatch, dtype):
    # a half-precision scatter-add stops counting at 2048 (fp16) / 256 (bf16) members on CUDA; the
    # accumulators must be float32 whatever the input dtype (CPU kernels hide the saturation)
    accumulators = []
    scatter_add = torch.Tensor.scatter_add

    def spy(self, *args, **kw):
        accumulators.append(self.dtype)
        return scatter_add(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "scatter_add", spy)
    q, k, v = (x.to(dtype) for x in blob_tokens(600, seed=1))
    out = clustered_attention(q, k, v, clusters=4)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert accumulators and set(accumulators) == {torch.float32}


def _autocast_error(device: str, dtype, n: int = 16384) -> float:
    from spineseg.models.attention import MultiHeadSelfAttention

    torch.manual_seed(0)
    mha = MultiHeadSelfAttention(32, heads=4, mode="clustered", clusters=100).to(device)
    q, _, _ = blob_tokens(n, seed=2)
    x = q[0].transpose(0, 1).reshape(1, n, -1)[..., :32].contiguous().to(device)
    with torch.no_grad():
        ref = mha.double()(x.double())
        mha.float()
        with torch.autocast(device, dtype=dtype):
            out = mha(x)
    return float((out.double() - ref).norm() / ref.norm())


def test_clustered_attention_under_cpu_autocast_matches_float64():
    assert _autocast_error("cpu", torch.bfloat16) < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clustered_attention_under_cuda_autocast_matches_float64(dtype):
    assert _autocast_error("cuda", dtype) < 3e-2


@pytest.mark.parametrize("name", model_names())
def test_every_registry_name_maps_64_to_64(name):
    m = build_model(name, base=8, clusters=16)
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 4, 64, 64)


# the paper's ablation rows (Tables 5-6): block type, encoder dilations, Transformer kind
ABLATION = {
    "unet": ("PlainBlock", (1, 1, 1, 1), None),
    "unet_res": ("ResBlock", (1, 1, 1, 1), None),
    "unet_tm": ("PlainBlock", (1, 1, 1, 1), "full"),
    "unet_ctm": ("PlainBlock", (1, 1, 1, 1), "clustered"),
    "unet_res_ctm": ("ResBlock", (1, 1, 1, 1), "clustered"),
    "resunet_ctm_dconv": ("ResBlock", (1, 2, 4, 8), "clustered"),
    "spineseg": ("ResBlock", (1, 2, 4, 8), "clustered"),
}


@pytest.mark.parametrize("name", list(ABLATION))
def test_registry_rows_build_the_networks_the_paper_describes(name):
    from spineseg.models.attention import TransformerBlock2d
    from spineseg.train.config import resolve_config

    block, dilations, attention = ABLATION[name]
    m = build_model(name, base=8, clusters=16)
    assert [type(e).__name__ for e in m.enc] == [block] * 4
    assert type(m.bottleneck).__name__ == block and all(type(d).__name__ == block for d in m.dec)
    convs = [[c for c in e.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3)] for e in m.enc]
    assert tuple(c[0].dilation[0] for c in convs) == dilations
    assert all(c.dilation == c.padding for stage in convs for c in stage)  # dilated convs keep the size
    blocks = [a for a in m.attn if isinstance(a, TransformerBlock2d)]
    if attention is None:
        assert not blocks
    else:  # one Transformer after each of stages 2-4, full or clustered as the row says
        assert [isinstance(a, TransformerBlock2d) for a in m.attn] == [False, True, True, True]
        assert {b.attn.mode for b in blocks} == {attention}
    # only the full model trains against the WGAN-GP critic
    adversarial = resolve_config(name)["train"]["adversarial"]
    assert adversarial == ("wgan-gp" if name == "spineseg" else "none")


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


def _disc_level_batch(false_body: bool):
    """Two slices: one with a body, drawn exactly; one at disc level (no body), with or without a false body."""
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, 20:26, 12:20] = 2  # canal on both
    y[0, 4:16, 8:24] = 1  # a body on the first only
    pred = y.clone()
    if false_body:
        pred[1, 4:16, 8:24] = 1
    return F.one_hot(pred, 4).permute(0, 3, 1, 2).float() * 5.0, y  # confident, as a trained network is


def test_batch_dice_counts_a_body_drawn_on_a_slice_without_one():
    per_image, batch = SegLoss(ce_weight=0.0), SegLoss(ce_weight=0.0, batch_dice=True)
    clean, wrong = _disc_level_batch(False), _disc_level_batch(True)
    # per image, the empty body channel of the disc-level slice scores ~1 whether or not a body is drawn there: its
    # faint background probabilities (~0.007 a pixel) already outweigh the smoothing term
    assert abs(float(per_image(*wrong) - per_image(*clean))) < 1e-3
    # over the batch, the false body halves the body's Dice (2 x 192 / (192 + 2 x 192)): +1/3 x 1/3 of the loss
    assert float(batch(*wrong) - batch(*clean)) == pytest.approx(1 / 9, abs=0.01)


def _independent_gradient_penalty(critic, img, real, fake, eps):
    """(||d critic / d x_hat||_2 - 1)^2 averaged over samples, one sample at a time with torch.func."""
    from torch.func import grad

    terms = []
    for i in range(img.shape[0]):
        x_hat = eps[i] * real[i] + (1 - eps[i]) * fake[i]
        g = grad(lambda x: critic(img[i:i + 1], x[None]).sum())(x_hat)
        terms.append((g.norm() - 1) ** 2)
    return torch.stack(terms).mean()


def test_wgan_gp_critic_loss_equals_an_independent_computation():
    torch.manual_seed(0)
    c = Critic(5, base=8).double()
    img = torch.randn(3, 1, 64, 64, dtype=torch.float64)
    real = one_hot(torch.randint(0, 4, (3, 64, 64)), 4).double()
    fake = torch.softmax(torch.randn(3, 4, 64, 64, dtype=torch.float64), 1)
    torch.manual_seed(11)
    loss = critic_loss("wgan-gp", c, img, real, fake, gp_lambda=10.0)
    torch.manual_seed(11)  # the same interpolation weights the loss drew
    eps = torch.rand(3, 1, 1, 1, dtype=torch.float64)
    gp = _independent_gradient_penalty(c, img, real, fake, eps)
    wasserstein = c(img, fake).mean() - c(img, real).mean()
    assert gp > 1e-3  # the penalty is not negligible here, so a wrong lambda shows
    assert float(loss) == pytest.approx(float(wasserstein + 10.0 * gp), rel=1e-9)
    torch.manual_seed(11)
    assert float(gradient_penalty(c, img, real, fake)) == pytest.approx(float(gp), rel=1e-9)
    for mode in ("wgan", "bce"):
        assert torch.isfinite(critic_loss(mode, c, img, real, fake))


def test_critic_refuses_batch_norm():
    from spineseg.models.critic import Critic

    with pytest.raises(ValueError):
        Critic(5, norm="batch")


def test_the_full_model_trains_its_critic_with_a_gradient_penalty_of_weight_10():
    """Gulrajani et al.'s lambda = 10, from the spineseg row's config all the way into the critic's update."""
    from spineseg.train.config import resolve_config
    from spineseg.train.steps import adversary_from_config

    tc = resolve_config("spineseg")["train"]
    critic = Critic(5, base=8)
    adversary = adversary_from_config(critic, torch.optim.Adam(critic.parameters()), tc)
    assert adversary.objective == "wgan-gp" and adversary.gp_lambda == 10.0
