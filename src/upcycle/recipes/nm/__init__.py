"""N:M (2:4) weight sparsity (not built yet): one-shot magnitude / Wanda / SparseGPT, CAST-style sparsity-aware
training (AdamS, weight scaling, self-distillation) and SR-STE as train hooks, a CPU decode kernel for N:M
linears. It will register a `Recipe` named "nm" with `NMSparseConfig` (see upcycle.recipes.registry)."""
