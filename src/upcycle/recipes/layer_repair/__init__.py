"""Long-context layer repair of bank-sparse models (not built yet): per-layer diagnosis of a long-context task
(each layer made dense in turn, with cheaper per-layer screens) and single-layer repair (raise keep, refit the
layer on long-context activations, or make it dense), written back through the bank-sparse recipe's
`keep_per_layer`."""
