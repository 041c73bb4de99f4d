// foveal/version.hpp — the one place the version is written (CMake and pyproject read it).
#pragma once

#define FOVEAL_VERSION_MAJOR 0
#define FOVEAL_VERSION_MINOR 1
#define FOVEAL_VERSION_PATCH 0
#define FOVEAL_VERSION "0.1.0"
