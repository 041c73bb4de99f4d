// foveal/embedding/spade/schema.hpp — SPADE (docs/spade.md): the feature schema: which features a
// token has, their kinds, vocabularies and delays.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "foveal/core/tensor.hpp"

namespace foveal {

enum class SpadeFeatureKind { discrete, continuous };

// One feature of a token: its kind, for discrete features the vocabulary and its PAD and
// MISSING ids, and its delay `shift` (>= 1; kDefaultShift = the default, feature index + 1).
struct SpadeFeature {
  // The shift that SpadeSchema replaces by f + 1. Every other value below 1, 0 included, is
  // rejected.
  static constexpr Index kDefaultShift = std::numeric_limits<Index>::min();

  std::string name;
  SpadeFeatureKind kind = SpadeFeatureKind::discrete;
  Index vocab_size = 0;  // discrete only
  Index pad_id = 0;      // discrete only
  Index missing_id = 0;  // discrete only
  Index shift = kDefaultShift;

  // A binned feature: vocabulary num_bins + 2, PAD = 0, bins 1..num_bins, MISSING = num_bins + 1.
  static SpadeFeature binned(std::string name, Index num_bins, Index shift = kDefaultShift);
  // A continuous feature (MISSING and PAD are the value 0).
  static SpadeFeature continuous(std::string name, Index shift = kDefaultShift);
};

// The ordered features of a token. Construction validates them (non-empty, unique names,
// discrete ids inside the vocabulary, shifts >= 1 and strictly increasing) and fills default
// shifts.
class SpadeSchema {
 public:
  SpadeSchema() = default;
  explicit SpadeSchema(std::vector<SpadeFeature> features);

  const std::vector<SpadeFeature>& features() const { return features_; }
  const SpadeFeature& feature(Index f) const { return features_[static_cast<std::size_t>(f)]; }
  Index num_features() const { return static_cast<Index>(features_.size()); }
  Index num_discrete() const { return static_cast<Index>(discrete_.size()); }
  Index num_continuous() const { return static_cast<Index>(continuous_.size()); }
  // Schema indices of the discrete / continuous features, in order (ids / values columns).
  const std::vector<Index>& discrete_features() const { return discrete_; }
  const std::vector<Index>& continuous_features() const { return continuous_; }
  // The column of feature f in ids (discrete) or values (continuous).
  Index column(Index f) const { return columns_[static_cast<std::size_t>(f)]; }
  // The largest shift: the delayed sequence of n tokens has n + max_shift() steps.
  Index max_shift() const { return features_.empty() ? 0 : features_.back().shift; }

 private:
  std::vector<SpadeFeature> features_;
  std::vector<Index> discrete_, continuous_, columns_;
};

}  // namespace foveal
