"""Choosing the fastest settings that fit: `planner` (make_plan, Plan) and `autoplan` (plan_for_config)."""
