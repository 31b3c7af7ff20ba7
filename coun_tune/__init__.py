"""coun-tune: distributed hyperparameter search for contrastive machine unlearning (CoUn).

Layers (imports point down only): cli -> search/tracking -> pareto -> core -> config.
`coun_tune.core` needs torch, numpy and scikit-learn only.
"""

__version__ = "0.1.0"
