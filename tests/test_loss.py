import torch

from shoestring.models.loss import IGNORE_INDEX, cross_entropy_from_hidden, reference_cross_entropy


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    weight = torch.randn(100, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 100, (3, 40), generator=g)
    targets[0, :7] = IGNORE_INDEX
    return hidden, weight, targets


def _grads(fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    (loss * 3.0).backward()  # a non-unit upstream gradient must be applied
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def test_chunked_loss_and_grads_equal_plain_version_fp32():
    hidden, weight, targets = _inputs()
    chunked = _grads(lambda h, w, t: cross_entropy_from_hidden(h, w, t, chunk=17), hidden, weight, targets)
    plain = _grads(reference_cross_entropy, hidden, weight, targets)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_is_close():
    hidden, weight, targets = _inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = _grads(cross_entropy_from_hidden, hidden, weight, targets)
        plain = _grads(reference_cross_entropy, hidden, weight, targets)
    assert chunked[1].dtype == torch.float32 and chunked[2].dtype == torch.float32
    torch.testing.assert_close(chunked[0], plain[0], rtol=2e-2, atol=2e-2)


def test_no_grad_path_computes_loss_only():
    hidden, weight, targets = _inputs(2)
    with torch.no_grad():
        loss = cross_entropy_from_hidden(hidden, weight, targets)
    torch.testing.assert_close(loss, reference_cross_entropy(hidden, weight, targets).detach())


def test_final_logit_softcap_loss_and_grads_equal_plain_version():
    """Gemma 2's c tanh(logits / c), with a cap small enough to change the loss."""
    hidden, weight, targets = _inputs(3)
    capped = _grads(lambda h, w, t: cross_entropy_from_hidden(h, w, t, chunk=17, softcap=2.0), hidden, weight, targets)
    plain = _grads(lambda h, w, t: reference_cross_entropy(h, w, t, softcap=2.0), hidden, weight, targets)
    for a, b in zip(capped, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert abs(capped[0] - reference_cross_entropy(hidden, weight, targets)) > 0.1


def test_frozen_head_gets_no_gradient_and_the_same_hidden_gradient():
    """LoRA freezes the head: no vocab x dim gradient is computed or kept for it."""
    hidden, weight, targets = _inputs(3)
    frozen = weight.detach()
    loss = cross_entropy_from_hidden(hidden, frozen, targets, chunk=17)
    (loss * 3.0).backward()
    expected = _grads(reference_cross_entropy, hidden.detach().requires_grad_(), weight, targets)
    assert frozen.grad is None
    torch.testing.assert_close(hidden.grad, expected[1], rtol=1e-5, atol=1e-6)


def test_compiled_pass_over_the_logits_equals_the_eager_one():
    """The compile lever's kernel (one fused pass over each chunk's logits): the same loss and
    gradients, soft-cap and ignored rows included."""
    hidden, weight, targets = _inputs(4)
    eager = _grads(lambda h, w, t: cross_entropy_from_hidden(h, w, t, chunk=40, softcap=2.0), hidden, weight, targets)
    fused = _grads(lambda h, w, t: cross_entropy_from_hidden(h, w, t, chunk=40, softcap=2.0, compiled=True),
                   hidden, weight, targets)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
