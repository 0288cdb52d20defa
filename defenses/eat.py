"""Ensemble adversarial training (Tramèr et al., ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import ascent_step, project
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import input_gradient
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.errors import BenchError
from bench.core.models import MODELS

SAME = "same"  # a static model with the run's own architecture (and its model parameters)


@register_defense("eat")
class EAT(Defense):
    """Tramèr et al. 2018, Sec. 3.3 / 4.2: FGSM examples are crafted either on the model being
    trained or on one of several *static* pre-trained models, the source drawn at random for each
    batch; L = ½·CE(f(x), y) + ½·CE(f(x_adv), y) (Kurakin et al. 2017's half clean, half adversarial
    loss; `clean_weight` = ½ as the authors' code, `tf_train`).

    FGSM: x_adv = x + ε·sign ∇ₓCE(h(x), ŷ) with ŷ = argmax h(x), the source model h's own prediction
    (the authors' MNIST code, loss 'training': predicted labels avoid label leaking, Kurakin et al.
    2017; their ImageNet models use Step-LL at ε = 16/256 instead). L2 threat: one step of length ε
    along the gradient.

    Choices where the paper is silent or ambiguous:
    - The paper rotates the source between the current model and one of the pre-trained models,
      selected at random in each batch; we follow the authors' MNIST code, a uniform draw among the
      current model and the k static ones (each batch, from the global RNG the trainer seeds).
    - Static models: the paper uses differently-architected ImageNet models (Inception v3,
      Inception-ResNet v2, ResNet v2) and, on MNIST, other CNN types. Here `static_models` names their
      architectures, "same" being the run's own; each is a `natural` run on the same data and
      training config (`ctx.pretrained`; `static_epochs` sets its epochs, by default the run's),
      static model i with seed = run seed + 1 + i, so the default
      ("same", "same") works on every dataset and gives two independently trained models: three
      sources, as the paper's Ens3 models. Any registered model name (e.g. "mlp") adds architectural
      diversity.
    - Cost: only the trained model's passes are counted; a static source costs one forward and one
      backward of its static model (the paper notes these could be precomputed without augmentation).
    """

    pretrained_defenses = ("natural",)

    @dataclass(frozen=True)
    class Config:
        static_models: tuple[str, ...] = (SAME, SAME)
        clean_weight: float = 0.5
        static_epochs: int | None = None  # the static models' training epochs; None: the run's

        def __post_init__(self):
            if not self.static_models:
                raise BenchError("at least one static model is needed (static_models)")
            for name in self.static_models:
                if name != SAME:
                    MODELS.get(name)  # BenchError with "did you mean" for an unknown architecture
            require(self, at_least_one=("static_epochs",))

    def setup(self, model, ctx):
        seed, c = ctx.pretrained.seed, self.config
        train = {"train": {"epochs": c.static_epochs}} if c.static_epochs is not None else {}
        self.static = [ctx.pretrained("natural", seed=seed + 1 + i, **({} if name == SAME else {"model": name}),
                                      **train) for i, name in enumerate(c.static_models)]

    def training_step(self, model, x, y, ctx):
        eps, norm, w = ctx.threat.eps, ctx.threat.norm, self.config.clean_weight
        source = int(torch.randint(len(self.static) + 1, ()))
        if source == len(self.static):  # the current model: its clean forward also gives ∇ₓ
            x_in = x.clone().requires_grad_(True)
            logits = model(x_in)
            grad, = torch.autograd.grad(ce_loss(logits, logits.argmax(1)).sum(), x_in, retain_graph=True)
        else:
            grad = input_gradient(self.static[source], x, lambda z: ce_loss(z, z.argmax(1)))
            logits = model(x)
        x_adv = project(ascent_step(x, grad, norm, eps), x, norm, eps)
        return w * F.cross_entropy(logits, y) + (1 - w) * F.cross_entropy(model(x_adv), y)
