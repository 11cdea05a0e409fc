"""Dense -> MoE sparse upcycling (not built yet): experts copied or split from each SwiGLU FFN, a router,
load-balancing and z losses as train hooks, grouped expert compute, export to native HF Mixtral / Qwen2-MoE.
It will register a `Recipe` named "moe" with `MoEUpcycleConfig` (see upcycle.recipes.registry)."""
