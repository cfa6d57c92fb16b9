"""Perturbation generators for training and evaluation. Inputs are images in [0, 1].

Calling convention (as torchattacks): ``attack(images, targets) -> adversarial images``.
"""

from bulwark.attacks.objectives import cross_entropy, dlr, kl_to_clean
from bulwark.attacks.pgd import PGD
from bulwark.attacks.single_step import FGSM, FGSM_RS, N_FGSM, SingleStep, input_gradient

__all__ = ["FGSM", "FGSM_RS", "N_FGSM", "PGD", "SingleStep", "cross_entropy", "dlr",
           "input_gradient", "kl_to_clean"]
