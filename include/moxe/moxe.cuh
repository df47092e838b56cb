// moxe: umbrella header (device launchers and host references of every family).
#pragma once

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/mma.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"

#include "moxe/mlstm/chunkwise.cuh"
#include "moxe/mlstm/reference.hpp"
#include "moxe/mlstm/per_token.cuh"
#include "moxe/mlstm/step.cuh"

#include "moxe/slstm/reference.hpp"
#include "moxe/slstm/per_token.cuh"
#include "moxe/slstm/sequence.cuh"
#include "moxe/slstm/step.cuh"

#include "moxe/router/entropy.cuh"
#include "moxe/router/gate.cuh"
#include "moxe/router/reference.hpp"
#include "moxe/router/topk.cuh"
#include "moxe/router/variants/expert_choice.cuh"
#include "moxe/router/variants/group_expert_choice.cuh"
#include "moxe/router/variants/group_restricted.cuh"
#include "moxe/router/variants/reference.hpp"
#include "moxe/router/variants/sigmoid_bias.cuh"
#include "moxe/router/variants/topp.cuh"

#include "moxe/loss/balance.cuh"
#include "moxe/loss/reference.hpp"

#include "moxe/dispatch/expert_parallel.cuh"
#include "moxe/dispatch/permute.cuh"
#include "moxe/dispatch/reference.hpp"
#include "moxe/dispatch/routing_map.cuh"
