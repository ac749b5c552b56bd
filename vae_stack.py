"""Train one or several independent VAEs in one pass over the same batches, with
hand-written gradients. `vae.py` trains one model with it; `sweep_vae.py` one
model per z_dim, all at once.

Why by hand: at batch 64 the five large matrix products of a step run near the
CPU's matmul peak, and what made an epoch slow was around them: autograd's
bookkeeping, torch's scalar-path softplus/log1p in the BCE (about 12 ns per
pixel), and Adam over ten parameter tensors. Here
- every model's parameters live in one flat buffer (the modules' parameters are
  views of it while training), and torch's fused Adam kernel updates it in three
  pieces, each as soon as the step is done with it (see FlatAdam);
- fc1 and fc4 of all models run as batched matrix products (bmm), the small
  z-sized layers one model at a time;
- the BCE comes from one sigmoid and one vectorized log (see bernoulli_nll), and
  its gradient is sigmoid(logits) - x.
Each model sees exactly what it would see alone: the same batches in the same
order (one shuffle generator) and its own eps generator with the same seed, so a
model trained in a stack follows the run it would have had by itself (up to
float rounding, which the tests bound).
"""
import math
import time

import torch

from thread_picker import ThreadPicker

# Below this |logit| the continuous-Bernoulli normalizer uses its Taylor series
# (the closed form is 0/0 at logit 0, i.e. lambda = 0.5).
CB_TAYLOR_WINDOW = 1e-2


# --------------------------------------------------------------------- loss terms

def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over the batch."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def cb_log_normalizer(logits):
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019), lambda = sigmoid(logits).

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), and with lambda = sigmoid(l),
    1 - 2 lambda = -tanh(l / 2) and artanh(1 - 2 lambda) = -l / 2, so C = l / tanh(l / 2):
    no log of a difference of probabilities, finite for any logit. At l = 0 (lambda = 0.5)
    that is 0/0 with limit 2, so a small window uses the series
    u / tanh(u) = 1 + u^2/3 - u^4/45 (u = l/2). The unused branch gets a harmless input
    so that no NaN leaks into the gradient through torch.where.
    """
    small = logits.abs() < CB_TAYLOR_WINDOW
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(0.5 * safe))
    u2 = (0.5 * logits).pow(2)
    series = math.log(2.0) + torch.log1p(u2 / 3 - u2.pow(2) / 45)
    return torch.where(small, series, exact)


def sum_images(values):
    """Sum over the last two dims (images x pixels): pixels first, then images.

    Each image's pixels are summed by one thread whatever the leading dims, so a
    model's loss has the same float rounding alone or in a stack of K models.
    """
    return values.sum(-1).sum(-1)


def bernoulli_nll(logits, x, probs=None):
    """Summed binary cross-entropy of sigmoid(logits) against x over the last two dims.

    Per pixel it is softplus(l) - x l = relu(l) - x l - log sigmoid(|l|), and
    sigmoid(|l|) = 0.5 + |sigmoid(l) - 0.5| lies in [0.5, 1]: stable for any
    logit, and a vectorized log is about 10x faster than torch's softplus on a CPU.
    ``probs`` (sigmoid(logits)) is reused when the caller has it.
    """
    probs = torch.sigmoid(logits) if probs is None else probs
    log_sig_abs = (probs - 0.5).abs_().add_(0.5).log_()
    return sum_images(logits.clamp(min=0) - x * logits - log_sig_abs)


def reconstruction_nll(logits, x, likelihood="bernoulli"):
    """The reconstruction term (nats, summed over the last two dims): the BCE, or the
    continuous-Bernoulli negative log-density (the BCE minus the log-normalizer)."""
    nll = bernoulli_nll(logits, x)
    if likelihood == "continuous-bernoulli":
        nll = nll - sum_images(cb_log_normalizer(logits))
    return nll


@torch.no_grad()
def evaluate(model, images, *, batch_size=1000, likelihood="bernoulli", seed=0):
    """(reconstruction term, KL term) per image of ``model`` on ``images``.

    The eps come from a generator seeded with ``seed``, so the same model and seed
    give the same numbers, and evaluating never shifts a training run's streams.
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    recon = torch.zeros((), dtype=torch.float64, device=device)
    kl = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        logits, mu, logvar = model.forward_logits(x, generator)
        recon += reconstruction_nll(logits, x.reshape(logits.shape), likelihood)
        kl += kl_divergence(mu, logvar)
    model.train()
    return recon.item() / len(images), kl.item() / len(images)


# ------------------------------------------------------------------- the stack

class FlatAdam:
    """torch's Adam (lr, betas 0.9/0.999, eps 1e-8, no weight decay) over the stack's
    flat buffer, applied a piece at a time.

    Adam updates each element on its own, so the step can update a piece (say fc4's
    weights) as soon as it has written that piece's gradient and will not read those
    weights again: the gradient is then read back while it is still in the cache.
    On the 2-core VM measured, steps taken in turns with the one-Adam-after-the-step
    version were 13% faster in the median and 3% at their quickest (the gain is
    largest when another tenant is using the shared cache). torch's fused kernel (``torch._fused_adam_``, what ``Adam(fused=True)``
    calls) gives bit for bit the weights ``torch.optim.Adam(fused=True)`` gives over
    the whole buffer (a test checks it); where this torch build has no fused kernel
    for the device, the same formula runs as plain tensor ops.
    """

    def __init__(self, flat, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.grads = flat.data, flat.grad
        self.exp_avg = torch.zeros_like(self.params)
        self.exp_avg_sq = torch.zeros_like(self.params)
        self.steps = torch.zeros((), dtype=torch.float32, device=self.params.device)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.fused = self._fused_works()

    def _fused_works(self):
        one = [torch.zeros(1, device=self.params.device) for _ in range(4)]
        try:
            torch._fused_adam_(*[[t] for t in one], [], [torch.ones((), device=self.params.device)],
                               amsgrad=False, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                               weight_decay=0.0, eps=self.eps, maximize=False)
            return True
        except (AttributeError, NotImplementedError, RuntimeError):
            return False

    def begin_step(self):
        """Count the step whose pieces ``update`` will now be given."""
        self.steps += 1

    def update(self, piece):
        """Adam on the elements ``piece`` (a slice of the flat buffer)."""
        p, g, m, v = (t[piece] for t in (self.params, self.grads, self.exp_avg, self.exp_avg_sq))
        beta1, beta2 = self.betas
        if self.fused:
            torch._fused_adam_([p], [g], [m], [v], [], [self.steps], amsgrad=False, lr=self.lr,
                               beta1=beta1, beta2=beta2, weight_decay=0.0, eps=self.eps, maximize=False)
            return
        step = self.steps.item()       # torch.optim.Adam's single-tensor formula
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(self.eps)
        p.addcdiv_(m, denom, value=-self.lr / (1 - beta1 ** step))


def relu_backward(grad, output):
    """grad where the ReLU's output is positive, else 0: the kernel autograd itself
    uses (one pass; a mask plus masked_fill_ costs about 5x more)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


def _carve(flat, spec):
    """Named views of consecutive pieces of a 1-D buffer."""
    views, offset = {}, 0
    for name, shape in spec:
        size = math.prod(shape)
        views[name] = flat[offset:offset + size].view(shape)
        offset += size
    return views


class StackedVAEs:
    """K assignment-style VAEs packed into one flat buffer, with a hand-written step.

    Layout: w1 (K, H, P), b1 (K, H), w4 (K, P, H), b4 (K, P) for the large layers
    (batched matmuls), then per model k: w2_k (2z, H) = [fc2_mu; fc2_logvar] (mu and
    logvar from ONE matmul), b2_k, w3_k (H, z), b3_k. While the stack lives, each
    module's parameters are views of this buffer (``release`` gives them back their
    own memory), so the modules always show the current weights.
    """

    def __init__(self, models):
        self.models = list(models)
        self.z_dims = [m.z_dim for m in self.models]
        K = len(self.models)
        H, P = self.models[0].encoder.fc1.weight.shape
        self.device = self.models[0].encoder.fc1.weight.device
        spec = [("w1", (K, H, P)), ("b1", (K, H)), ("w4", (K, P, H)), ("b4", (K, P))]
        for k, z in enumerate(self.z_dims):
            spec += [(f"w2_{k}", (2 * z, H)), (f"b2_{k}", (2 * z,)), (f"w3_{k}", (H, z)), (f"b3_{k}", (H,))]
        total = sum(math.prod(shape) for _, shape in spec)
        # The pieces FlatAdam updates within a step, in the order the step finishes with them.
        encoder_end = K * H * P + K * H
        decoder_end = encoder_end + K * P * H + K * P
        self.pieces = {"fc4": slice(encoder_end, decoder_end), "small": slice(decoder_end, total),
                       "fc1": slice(0, encoder_end)}
        self.flat = torch.nn.Parameter(torch.zeros(total, device=self.device))
        self.flat.grad = torch.zeros(total, device=self.device)
        self.p = _carve(self.flat.data, spec)
        self.g = _carve(self.flat.grad, spec)
        self._owned = []
        for k, model in enumerate(self.models):
            for param, view in self._views_of(model, k):
                if param.shape != view.shape:
                    raise ValueError(f"model {k}: parameter of shape {tuple(param.shape)}, "
                                     f"expected {tuple(view.shape)}")
                view.copy_(param.detach())
                param.data = view
                self._owned.append(param)
            if len(set(map(id, model.parameters()))) != len(self._views_of(model, k)):
                raise ValueError(f"model {k} has parameters beyond the assignment's VAE")

    def _views_of(self, model, k):
        p, z = self.p, self.z_dims[k]
        enc, dec = model.encoder, model.decoder
        return [(enc.fc1.weight, p["w1"][k]), (enc.fc1.bias, p["b1"][k]),
                (enc.fc2_mu.weight, p[f"w2_{k}"][:z]), (enc.fc2_logvar.weight, p[f"w2_{k}"][z:]),
                (enc.fc2_mu.bias, p[f"b2_{k}"][:z]), (enc.fc2_logvar.bias, p[f"b2_{k}"][z:]),
                (dec.fc3.weight, p[f"w3_{k}"]), (dec.fc3.bias, p[f"b3_{k}"]),
                (dec.fc4.weight, p["w4"][k]), (dec.fc4.bias, p["b4"][k])]

    def release(self):
        """Give each module's parameters their own memory again (the buffer can go)."""
        for param in self._owned:
            param.data = param.data.clone()
        self._owned = []

    @torch.no_grad()
    def step(self, x, eps_generators, likelihood="bernoulli", adam=None):
        """Loss of each model on batch ``x`` (B x P), a (K,) tensor; the gradient of
        their sum goes into ``self.flat.grad`` (every element is overwritten). With
        ``adam`` (a FlatAdam over ``self.flat``), the weights take that Adam step too,
        each piece as soon as the step is done with it."""
        p, g = self.p, self.g
        update = adam.update if adam is not None else (lambda piece: None)
        if adam is not None:
            adam.begin_step()
        K, B = len(self.z_dims), len(x)
        xs = x.expand(K, *x.shape)
        h1 = torch.baddbmm(p["b1"].unsqueeze(1), xs, p["w1"].transpose(1, 2)).relu_()   # K x B x H
        h3 = torch.empty(K, B, h1.shape[2], device=x.device)
        kl = torch.empty(K, device=x.device)
        latents = []
        for k, z in enumerate(self.z_dims):
            stats = torch.addmm(p[f"b2_{k}"], h1[k], p[f"w2_{k}"].t())      # B x 2z: [mu, logvar]
            mu, logvar = stats[:, :z], stats[:, z:]
            std = logvar.mul(0.5).exp_()
            eps = torch.randn(B, z, generator=eps_generators[k], device=x.device)
            code = torch.addcmul(mu, eps, std)
            torch.addmm(p[f"b3_{k}"], code, p[f"w3_{k}"].t(), out=h3[k]).relu_()
            # KL = 0.5 sum(mu^2 + std^2 - 1 - logvar)
            kl[k] = 0.5 * (torch.addcmul(std * std, mu, mu).sub_(logvar).sum() - B * z)
            latents.append((mu, std, eps, code))
        logits = torch.baddbmm(p["b4"].unsqueeze(1), h3, p["w4"].transpose(1, 2))     # K x B x P
        probs = torch.sigmoid(logits)
        nll = bernoulli_nll(logits, x, probs)
        dlogits = probs.sub_(x)                        # d BCE / d logits = sigmoid(l) - x
        if likelihood == "continuous-bernoulli":
            with torch.enable_grad():
                leaf = logits.detach().requires_grad_()
                log_c = sum_images(cb_log_normalizer(leaf))
                (d_log_c,) = torch.autograd.grad(log_c.sum(), leaf)
            nll = nll - log_c.detach()
            dlogits.sub_(d_log_c)
        torch.bmm(dlogits.transpose(1, 2), h3, out=g["w4"])
        torch.sum(dlogits, 1, out=g["b4"])
        dh3 = relu_backward(torch.bmm(dlogits, p["w4"]), h3)
        update(self.pieces["fc4"])                     # fc4's weights are not read again
        dh1 = torch.empty_like(h1)
        for k, z in enumerate(self.z_dims):
            mu, std, eps, code = latents[k]
            torch.mm(dh3[k].t(), code, out=g[f"w3_{k}"])
            torch.sum(dh3[k], 0, out=g[f"b3_{k}"])
            dcode = torch.mm(dh3[k], p[f"w3_{k}"])
            dstats = torch.empty(B, 2 * z, device=x.device)
            torch.add(dcode, mu, out=dstats[:, :z])                                # d/dmu: recon + KL
            # d/dlogvar = 0.5 (dcode eps std + std^2 - 1): recon through std, then KL
            dlogvar = torch.mul(dcode, eps, out=dstats[:, z:]).mul_(std)
            dlogvar.addcmul_(std, std).sub_(1.0).mul_(0.5)
            # (h1^T dstats)^T rather than dstats^T h1: for small z, MKL splits the latter's
            # 64-long sum across threads, and its rounding would depend on --threads.
            g[f"w2_{k}"].copy_(torch.mm(h1[k].t(), dstats).t())
            torch.sum(dstats, 0, out=g[f"b2_{k}"])
            torch.mm(dstats, p[f"w2_{k}"], out=dh1[k])
        update(self.pieces["small"])
        dh1 = relu_backward(dh1, h1)
        torch.bmm(dh1.transpose(1, 2), xs, out=g["w1"])
        torch.sum(dh1, 1, out=g["b1"])
        update(self.pieces["fc1"])
        return nll + kl


def train_stack(models, train_x, test_x=None, *, epochs=15, batch_size=64, lr=1e-3, seed=0,
                likelihood="bernoulli", progress=True, log=print, labels=None, threads=None):
    """Train ``models`` (VAEs, any z_dims) in place on the same batches; one history each.

    A history holds, per epoch: ``train_loss`` (the epoch's summed loss over the
    number of training images), and with ``test_x`` the test loss and its two
    terms, ``test_loss`` = ``test_recon`` + ``test_kl`` (per image, see
    ``evaluate``, seeded with ``seed``); and ``seconds`` (wall time of each epoch's
    training) and ``threads`` (the CPU threads it ran on: ``threads``, or with None
    the faster of 1 and torch's count, see ThreadPicker). Batches: a per-epoch
    shuffled copy from a generator seeded with ``seed``; eps: one generator per
    model seeded with ``seed + 1``. A non-finite epoch loss raises
    FloatingPointError naming the epoch and the model.
    """
    from tqdm import tqdm

    labels = labels or [f"z_dim {m.z_dim}" for m in models]
    stack = StackedVAEs(models)
    device = stack.device
    adam = FlatAdam(stack.flat, lr)
    shuffler = torch.Generator().manual_seed(seed)
    eps_generators = [torch.Generator(device=device).manual_seed(seed + 1) for _ in models]
    train_x = train_x.to(device)
    n = len(train_x)
    steps = math.ceil(n / batch_size)
    histories = [{"train_loss": [], "test_loss": [], "test_recon": [], "test_kl": [], "seconds": [],
                  "threads": []} for _ in models]
    picker = ThreadPicker(threads, device)
    try:
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            shuffled = train_x[torch.randperm(n, generator=shuffler).to(device)]
            # Summed on the device and read once per epoch: a per-step .item() would
            # force a synchronization (on a GPU) and costs a little even on a CPU.
            total = torch.zeros(len(models), dtype=torch.float64, device=device)
            bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                       disable=None if progress else True)
            for step in picker.schedule(steps):
                x = shuffled[step * batch_size:(step + 1) * batch_size]
                total += stack.step(x, eps_generators, likelihood, adam)
                if not bar.disable and (step + 1) % 50 == 0:
                    bar.update(50)
            bar.close()
            seconds = time.perf_counter() - start
            for k, (model, history) in enumerate(zip(models, histories)):
                history["train_loss"].append(total[k].item() / n)
                history["seconds"].append(seconds)
                history["threads"].append(picker.chosen[-1])
                if test_x is not None:
                    recon, kl = evaluate(model, test_x, likelihood=likelihood, seed=seed)
                    history["test_recon"].append(recon)
                    history["test_kl"].append(kl)
                    history["test_loss"].append(recon + kl)
                last = [history[key][-1] for key in ("train_loss", "test_loss") if history[key]]
                if not all(map(math.isfinite, last)):
                    raise FloatingPointError(f"loss became non-finite at epoch {epoch} ({labels[k]})")
            if log is not None:
                log(epoch_line(epoch, epochs, labels, histories, seconds))
    finally:
        stack.release()
        picker.restore()
    return histories


def epoch_line(epoch, epochs, labels, histories, seconds):
    """One log line per epoch: each model's train (and test) loss, then the epoch's time."""
    parts = []
    for label, history in zip(labels, histories):
        part = f"train loss {history['train_loss'][-1]:8.3f}"
        if history["test_loss"]:
            part += f"  test loss {history['test_loss'][-1]:8.3f}"
        parts.append(part if len(labels) == 1 else f"{label}: {part}")
    threads = histories[0]["threads"][-1]
    return (f"epoch {epoch:2d}/{epochs}  " + " | ".join(parts) +
            f"  {seconds:5.2f} s, {threads} thread{'s' if threads > 1 else ''}")
