// foveal/embedding/spade.hpp — SPADE split-and-delay embeddings (docs/spade.md), one header
// per idea under spade/: the feature schema, delay / undelay, training helpers, the embedding
// module and the generation state machine.
//
// A token has F features in schema order. Discrete features travel as int64 ids in one
// tensor `ids [B, *, Fd]`, continuous ones as float values in `values [B, *, Fc]`, each in
// schema order (Fd + Fc = F); per-stream masks and logits cover all F features.
#pragma once

#include "foveal/embedding/spade/decoder.hpp"
#include "foveal/embedding/spade/delay.hpp"
#include "foveal/embedding/spade/embedding.hpp"
#include "foveal/embedding/spade/schema.hpp"
#include "foveal/embedding/spade/training.hpp"
