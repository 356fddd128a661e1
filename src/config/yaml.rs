//! Reading YAML: streamed, with key paths in errors and no source lines in them.

/// Deserializes YAML `text`. Streamed: serde-saphyr builds no document tree, so a config of
/// 100,000 accounts peaks at about twice its final size while parsing (serde_norway held every
/// event of the document: ~15×). Errors name the key path (`accounts.fleet-a.password: ...`) and the
/// line, never show the source line (it may hold a secret). Duplicate keys are refused and
/// `!include` is off. The node and event budgets scale with the input (every node takes input
/// bytes), so any config that fits in memory parses; alias expansion keeps the library's limits.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut budget = serde_saphyr::Budget::default();
    let scale = text.len().saturating_add(1024);
    budget.max_nodes = budget.max_nodes.max(scale);
    budget.max_events = budget.max_events.max(scale);
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(scale);
    budget.max_inclusion_depth = 0;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    let mut failed_at = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        let mut track = serde_path_to_error::Track::new();
        T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
            .inspect_err(|_| failed_at = Some(track.path()))
    })
    .map_err(|e| match failed_at.map(|p| p.to_string()) {
        Some(path) if path != "." => format!("{path}: {e}"),
        _ => e.to_string(),
    })
}
