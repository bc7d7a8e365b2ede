"""The HeLLM/MMHCL authors' tuned stage-1 hyper-parameters per dataset (their logs; METHOD §3).

L_u = user_layers, L_i = item_layers, λ_u / λ_i = lambda_u / lambda_i, k = knn_k, τ = tau, λ_reg = reg, d = 64.
The authors train with Adam at lr 1e-4; hellm_ds defaults to 1e-3 (see ``GraphTrainConfig.lr``).
"""
GRAPH_PRESETS: dict[str, dict] = {
    "beauty": {"model": {"user_layers": 2, "item_layers": 1, "lambda_u": 0.9, "lambda_i": 0.1, "tau": 0.5,
                         "reg": 1e-4}, "train": {"knn_k": 10}},
    "sports": {"model": {"user_layers": 2, "item_layers": 2, "lambda_u": 0.7, "lambda_i": 0.1, "tau": 0.5,
                         "reg": 1e-3}, "train": {"knn_k": 5}},
    "toys": {"model": {"user_layers": 3, "item_layers": 2, "lambda_u": 0.03, "lambda_i": 0.07, "tau": 0.3,
                       "reg": 1e-3}, "train": {"knn_k": 10}},
}
