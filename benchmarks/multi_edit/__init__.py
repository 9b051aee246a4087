"""Many rules in one model: what the k-th edit does to the others, stacked, sequential and batched.

On each trained testbed classifier, a draw is 8 distinct concept-style pairs that qualify under the
efficacy protocol (``surgery.testbed.protocol``); each pair's edit is made as the efficacy benchmark makes
it (N exemplars of a target class, one rewrite per deep candidate layer at a grid of strengths, the choice
on validation scenes within the clean budget). For k in {1, 2, 4, 8} (the draw's first k pairs):

- **stacked**: the k solo edits, each made on the unedited model, applied together;
- **sequential**: edit i made (candidates and choice) on the model already carrying edits 1 .. i-1;
- **batch**: one :func:`surgery.batch.rewrite_rules` edit of the k rules at the layer most of their solo
  edits chose, its strength chosen on the union of their validation scenes within the budget.

For every rule, on its pair's TEST scenes: errors corrected on other classes (exemplars' style) and on
the target class, and its *retained efficacy*, the share of its solo edit's other-class correction that
the k-rule model keeps; with the clean test accuracy of the model carrying all k. Writes
``benchmarks/results/multi_edit.{md,json,png}``.
"""
