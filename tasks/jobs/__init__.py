"""Jobs: their store, statuses, notifications, lifecycle, reconciler and the generate task."""
