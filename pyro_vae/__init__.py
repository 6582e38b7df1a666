"""pyro_vae: variational autoencoders written as Pyro model/guide pairs."""

from pyro_vae.ais import (
    AISResult,
    BDMCResult,
    annealed_importance_sampling,
    bidirectional_monte_carlo,
    estimate_log_likelihood_ais,
    simulate_data,
)
from pyro_vae.compare import (
    Comparison,
    compare_elbo_variance,
    compare_gradient_variance,
    compare_objective_gradients,
    compare_run,
    compare_training,
)
from pyro_vae.config import Config
from pyro_vae.data import DATASETS, Dataset, iterate_batches, load_dataset
from pyro_vae.estimators import (
    ELBOTerms,
    estimate_elbo,
    estimate_elbo_terms,
    estimate_log_likelihood,
    estimate_log_likelihood_curve,
)
from pyro_vae.evaluate import Evaluation, active_units, evaluate_run, evaluate_vae
from pyro_vae.guides import GUIDES, GuideFamily, get_guide
from pyro_vae.hierarchical import HierarchicalVAE
from pyro_vae.likelihoods import LIKELIHOODS, Likelihood, get_likelihood
from pyro_vae.objectives import ELBOS, get_elbo
from pyro_vae.priors import PRIORS, Prior, get_prior
from pyro_vae.runs import Run, load_run, resume_run, train_run
from pyro_vae.train import evaluate_elbo, fit
from pyro_vae.vae import VAE

__version__ = "0.1.0"

__all__ = [
    "AISResult",
    "BDMCResult",
    "Comparison",
    "Config",
    "DATASETS",
    "Dataset",
    "ELBOS",
    "ELBOTerms",
    "Evaluation",
    "GUIDES",
    "GuideFamily",
    "HierarchicalVAE",
    "LIKELIHOODS",
    "Likelihood",
    "PRIORS",
    "Prior",
    "Run",
    "VAE",
    "active_units",
    "annealed_importance_sampling",
    "bidirectional_monte_carlo",
    "compare_elbo_variance",
    "compare_gradient_variance",
    "compare_objective_gradients",
    "compare_run",
    "compare_training",
    "estimate_elbo",
    "estimate_elbo_terms",
    "estimate_log_likelihood",
    "estimate_log_likelihood_ais",
    "estimate_log_likelihood_curve",
    "evaluate_elbo",
    "evaluate_run",
    "evaluate_vae",
    "fit",
    "get_elbo",
    "get_guide",
    "get_likelihood",
    "get_prior",
    "iterate_batches",
    "load_dataset",
    "load_run",
    "resume_run",
    "simulate_data",
    "train_run",
]
