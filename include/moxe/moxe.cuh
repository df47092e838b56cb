// moxe: umbrella header (device launchers and host references of every family).
#pragma once

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
