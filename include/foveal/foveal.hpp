// foveal/foveal.hpp — the umbrella header: everything a user of foveal needs.
#pragma once

#include "foveal/attention/decode.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/kv_cache.hpp"
#include "foveal/attention/merge.hpp"
#include "foveal/attention/options.hpp"
#include "foveal/attention/registry.hpp"
#include "foveal/attention/sliding_window.hpp"
#include "foveal/attention/sparsek.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/core/tensor.hpp"
#include "foveal/embedding/spade.hpp"
#include "foveal/embedding/vq.hpp"
#include "foveal/ssm/pde_ssm.hpp"
#include "foveal/version.hpp"
