"""The planner's search: our column-split proposer ahead of torchrec's, the partitioner, and the
stats hook that keeps the chosen options.

By default (sharding.proposer=best) the planner also considers tables split into narrower column
slices than torchrec enumerates (_ColumnSplitProposer): torchrec offers one column-wise split per
table, 128 columns a shard, so a table at most 128 wide stays whole and a plan can keep no more
ranks busy than there are tables. torchrec's cost model, which rates a plan by its slowest rank,
still picks among all proposals.
"""

from __future__ import annotations

import copy
from collections import defaultdict

from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.partitioners import MemoryBalancedPartitioner
from torchrec.distributed.planner.proposers import GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.types import Enumerator, Proposer, Shard, ShardingOption, Stats
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import ShardingType

from app.config import ShardingConfig


class _ColumnSplitProposer(Proposer):
    """Proposes plans with tables split into column slices down to 4 columns wide (torchrec's
    enumerator splits at 128 columns only): with about as many slices as ranks every rank gets
    work, and a slice costs less than its whole table.

    Each table has a chain of options: its column splits from the finest (no more slices than
    ranks, none narrower than its min_partition constraint) to the coarsest, then its option of
    least total cost, of two kinds: any (a small table's replicas, often) and one not replicated
    (usually the whole table on one rank). Along each kind of chains, two walks, one table a step:
    from finest to whole, merging the most split table on the slowest rank, which frees ranks
    until about one slice per rank is left; then from whole to finest, splitting the table with
    the costliest shard on the slowest rank. A walk ends where the slowest rank has no table left
    to move, or at a proposal that does not fit in memory. The planner rates every proposal by its
    slowest rank and keeps the first of the fastest: this proposer goes before torchrec's, so of
    plans rated alike the one with the most ranks busy wins.

    Only tables the constraints allow column_wise get splits; torchrec's proposers cover the
    other types."""

    _FINEST = 4

    def __init__(self, world_size: int, min_partitions: dict[str, int]) -> None:
        self._world_size = world_size
        self._min_partitions = min_partitions  # by table name
        # each walk: its chains by table, its step along them (+1 coarser, -1 finer), where each table is
        self._walks: list[tuple[dict[str, list[ShardingOption]], int, dict[str, int]]] = []

    def load(self, search_space: list[ShardingOption], enumerator: Enumerator | None = None) -> None:
        by_table: dict[str, list[ShardingOption]] = defaultdict(list)
        for option in search_space:
            by_table[option.fqn].append(option)
        cheapest = {fqn: min(options, key=lambda o: o.total_perf) for fqn, options in by_table.items()}
        unreplicated = {
            fqn: min(
                [o for o in options if o.sharding_type != ShardingType.DATA_PARALLEL.value] or options,
                key=lambda o: o.total_perf,
            )
            for fqn, options in by_table.items()
        }
        column_wise = {
            fqn: [
                o
                for o in options
                if o.sharding_type == ShardingType.COLUMN_WISE.value
                and o.compute_kernel == unreplicated[fqn].compute_kernel
            ]
            for fqn, options in by_table.items()
        }
        splits = {
            fqn: [split for option in options for split in self._splits(option)] for fqn, options in column_wise.items()
        }
        if enumerator is not None:
            enumerator.populate_estimates([split for table in splits.values() for split in table])
        self._walks = []
        for wholes in [cheapest, unreplicated] if cheapest != unreplicated else [cheapest]:
            chains = {}
            for fqn, whole in wholes.items():
                by_count = {
                    o.num_shards: o
                    for o in column_wise[fqn] + splits[fqn]
                    if unreplicated[fqn].num_shards < o.num_shards <= self._world_size
                }
                chains[fqn] = [by_count[n] for n in sorted(by_count, reverse=True)] + [whole]
            self._walks += [
                (chains, +1, dict.fromkeys(chains, 0)),
                (chains, -1, {fqn: len(chain) - 1 for fqn, chain in chains.items()}),
            ]

    def _splits(self, option: ShardingOption) -> list[ShardingOption]:
        """A column-wise option at every other width torchrec's own splits take (a multiple of 4,
        as fbgemm's kernels need, dividing the table's width); their estimates still to be made."""
        made = []
        columns = option.tensor.shape[1]
        narrowest = self._min_partitions.get(option.name, 0)
        for width in range(self._FINEST, columns, self._FINEST):
            slices = columns // width
            if width < narrowest or columns % width or slices == option.num_shards or slices > self._world_size:
                continue
            sizes, offsets = calculate_shard_sizes_and_offsets(
                option.tensor, self._world_size, self._world_size, option.sharding_type, col_wise_shard_dim=width
            )
            split = copy.deepcopy(option)
            split.shards = [Shard(size=size, offset=offset) for size, offset in zip(sizes, offsets)]
            made.append(split)
        return made

    def propose(self) -> list[ShardingOption] | None:
        if not self._walks:
            return None
        chains, _, positions = self._walks[0]
        return [chains[fqn][index] for fqn, index in positions.items()]

    def feedback(
        self,
        partitionable: bool,
        plan: list[ShardingOption] | None = None,
        perf_rating: float | None = None,
        storage_constraint: Topology | None = None,
    ) -> None:
        chains, step, positions = self._walks[0]
        table = self._next_table(chains, step, positions, plan) if partitionable and plan else None
        if table is None:
            self._walks.pop(0)
        else:
            positions[table] += step

    @staticmethod
    def _next_table(
        chains: dict[str, list[ShardingOption]], step: int, positions: dict[str, int], plan: list[ShardingOption]
    ) -> str | None:
        load: dict[int, float] = defaultdict(float)
        tables_on: dict[int, set] = defaultdict(set)
        for option in plan:
            for shard in option.shards:
                if shard.rank is not None:  # None: a plan from the planner's cache, placed before
                    load[shard.rank] += shard.perf.total
                    tables_on[shard.rank].add(option.fqn)
        slowest = max(load, key=lambda rank: load[rank]) if load else None
        movable = [
            fqn
            for fqn, index in positions.items()
            if 0 <= index + step < len(chains[fqn]) and (slowest is None or fqn in tables_on[slowest])
        ]
        if not movable:
            return None
        current = {fqn: chains[fqn][positions[fqn]] for fqn in movable}
        if step > 0:  # merge the most split table
            return max(movable, key=lambda fqn: (current[fqn].num_shards, fqn))
        # split the table with the costliest shard
        return max(
            movable, key=lambda fqn: (max(s.perf.total for s in current[fqn].shards), -current[fqn].num_shards, fqn)
        )


def _search(config: ShardingConfig, constraints: dict[str, ParameterConstraints], world_size: int) -> dict:
    """The planner's proposers and partitioner as configured (torchrec's defaults otherwise)."""
    search = {}
    if config.proposer == "best":
        min_partitions = {name: c.min_partition for name, c in constraints.items() if c.min_partition}
        # ours first, then torchrec's defaults (EmbeddingShardingPlanner's own list)
        search["proposer"] = [
            _ColumnSplitProposer(world_size, min_partitions),
            GridSearchProposer(),
            GreedyProposer(),
            GreedyProposer(use_depth=False),
            UniformProposer(),
        ]
    elif config.proposer == "greedy":
        search["proposer"] = [GreedyProposer()]
    elif config.proposer == "uniform":
        search["proposer"] = [UniformProposer()]
    if config.partitioner == "memory_balanced":
        search["partitioner"] = MemoryBalancedPartitioner()
    return search


class _Chosen(Stats):
    """Keeps the planner's chosen sharding options: each shard's rank, storage (HBM, DDR) and
    estimated cost, which the ShardingPlan itself does not carry. (In place of the planner's
    default stats, which log the same as a long table.)"""

    def __init__(self) -> None:
        self.options: list[ShardingOption] = []

    def log(
        self,
        sharding_plan,
        topology,
        batch_size,
        storage_reservation,
        num_proposals,
        num_plans,
        run_time,
        best_plan,
        *args,
        **kwargs,
    ) -> None:
        self.options = list(best_plan)
