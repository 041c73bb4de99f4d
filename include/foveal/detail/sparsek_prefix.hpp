// foveal/detail/sparsek_prefix.hpp — SPARSEK over a growing prefix, one score at a time.
//
// Adding a score to the prefix adds a non-negative term to f(τ) = Σ clip(z_i − τ, 0, 1), so the
// threshold solving f(τ) = k never decreases. Two consequences carry the whole design:
//  * a score at or below τ contributes 0 now and forever: it is dropped for good;
//  * the scores above τ split into "ones" (z >= τ + 1) and "fractional" (τ < z < τ + 1), and as
//    τ rises a score only ever moves ones -> fractional -> dropped.
// Each score is pushed, moved and popped at most once: O(log n) amortized per added score, so
// the thresholds of all n prefixes cost O(n log n) instead of n separate O(n) projections.
//
// The fractional part is kept as g = Σ_fractional (z − τ) (the fractional p values, each in
// (0, 1)), never as a raw sum of scores, so scores of huge magnitude do not cancel: every update
// is a difference of nearby numbers.
//
// The top-k set of the prefix (ties: the lower index wins) is a separate heap of k entries;
// a key that leaves it never returns (a later key displaces it only by scoring higher).
#pragma once

#include <algorithm>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "foveal/core/tensor.hpp"

namespace foveal::detail {

// The SPARSEK threshold τ of a prefix of scores that grows one score at a time.
class PrefixThreshold {
 public:
  explicit PrefixThreshold(Index k) : k_(static_cast<double>(k)) {
    ones_.reserve(static_cast<std::size_t>(k) + 1);
  }

  // Forgets every score (τ = -inf again).
  void reset() {
    ones_.clear();
    fractional_.clear();
    tau_ = -std::numeric_limits<double>::infinity();
    excess_ = 0;
  }

  // τ of the prefix so far; -inf while it holds <= k scores (every p = 1).
  double threshold() const { return tau_; }

  // How many scores it holds: those with p > 0 now (at most k with p = 1, and the fractional
  // ones); a score with p = 0 is dropped for good.
  Index held() const { return static_cast<Index>(ones_.size() + fractional_.size()); }

  // Adds the finite score z to the prefix and raises τ until Σ p = k again.
  void push(double z) {
    if (z <= tau_) return;  // p = 0 now, and τ never comes back down
    if (z >= tau_ + 1) {
      push_min(ones_, z);
    } else {
      push_min(fractional_, z);
      excess_ += z - tau_;
    }
    raise();
  }

 private:
  using MinHeap = std::vector<double>;
  static void push_min(MinHeap& heap, double z) {
    heap.push_back(z);
    std::push_heap(heap.begin(), heap.end(), std::greater<double>());
  }
  static double pop_min(MinHeap& heap) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<double>());
    const double z = heap.back();
    heap.pop_back();
    return z;
  }

  // f(τ) = |ones| + excess_; moves τ up to where f = k, crossing breakpoints as needed.
  void raise() {
    for (;;) {
      const double surplus = static_cast<double>(ones_.size()) + excess_ - k_;
      if (surplus <= 0) return;
      const double fractional_count = static_cast<double>(fractional_.size());
      // The next breakpoint above τ: a fractional score reaching 0, or a one starting to drop.
      const double next_zero =
          fractional_.empty() ? std::numeric_limits<double>::infinity() : fractional_.front();
      const double next_fraction =
          ones_.empty() ? std::numeric_limits<double>::infinity() : ones_.front() - 1;
      const double next = std::min(next_zero, next_fraction);
      if (fractional_count > 0 && fractional_count * (next - tau_) >= surplus) {
        tau_ += surplus / fractional_count;
        excess_ = k_ - static_cast<double>(ones_.size());
        return;
      }
      // f stays above k up to the breakpoint: move there and update the sets.
      if (fractional_count > 0) excess_ -= fractional_count * (next - tau_);
      tau_ = next;
      while (!fractional_.empty() && fractional_.front() <= tau_) {
        excess_ -= pop_min(fractional_) - tau_;  // 0 up to rounding
      }
      while (!ones_.empty() && ones_.front() - 1 <= tau_) {
        const double z = pop_min(ones_);
        push_min(fractional_, z);
        excess_ += z - tau_;
      }
    }
  }

  double k_;
  MinHeap ones_;        // scores with p = 1
  MinHeap fractional_;  // scores with 0 < p < 1
  double tau_ = -std::numeric_limits<double>::infinity();
  double excess_ = 0;  // Σ over fractional_ of (z − τ)
};

// The k highest-scored keys of a prefix that grows one key at a time, ties to the lower index.
class PrefixTopK {
 public:
  explicit PrefixTopK(Index k) : k_(k) { heap_.reserve(static_cast<std::size_t>(k) + 1); }

  void reset() { heap_.clear(); }

  // Adds key `index` (greater than every index added before) with score z. Returns the key
  // that leaves the set: -1 when the set had room, `index` itself when it does not enter.
  Index push(Index index, double z) {
    if (static_cast<Index>(heap_.size()) < k_) {
      heap_.emplace_back(z, index);
      std::push_heap(heap_.begin(), heap_.end(), Worse());
      return -1;
    }
    // A tie keeps the older key: the new one needs a strictly higher score.
    if (!(z > heap_.front().first)) return index;
    std::pop_heap(heap_.begin(), heap_.end(), Worse());
    const Index evicted = heap_.back().second;
    heap_.back() = {z, index};
    std::push_heap(heap_.begin(), heap_.end(), Worse());
    return evicted;
  }

 private:
  // Heap order with the entry to evict first on top: the lowest score, among equal scores the
  // highest index.
  struct Worse {
    bool operator()(const std::pair<double, Index>& a, const std::pair<double, Index>& b) const {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    }
  };

  Index k_;
  std::vector<std::pair<double, Index>> heap_;
};

}  // namespace foveal::detail
