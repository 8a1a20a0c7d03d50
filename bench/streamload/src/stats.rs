//! The delay arithmetic of the load client: per-gap added delay and nearest-rank percentiles.

/// Added delay of every gap that ends inside `[lo, hi]` (ns): the client's arrival gap minus the mock's
/// send gap for the same frame. `arrivals[j]` and `sends[j]` are the times of frame `j` (0 = first).
/// Returns how many frames (gap or not, frame 0 included) arrived inside the window.
pub fn added_delays(
    arrivals: &[u64],
    sends: &[u64],
    lo: u64,
    hi: u64,
    out: &mut Vec<i64>,
) -> usize {
    let mut in_window = 0;
    for (j, &a) in arrivals.iter().enumerate() {
        if a < lo || a > hi {
            continue;
        }
        in_window += 1;
        if j == 0 || j >= sends.len() {
            continue;
        }
        let arrival_gap = a as i64 - arrivals[j - 1] as i64;
        let send_gap = sends[j] as i64 - sends[j - 1] as i64;
        out.push(arrival_gap - send_gap);
    }
    in_window
}

/// How late the mock wrote each frame against its schedule (`sends[0] + j * interval`), ns.
pub fn lateness(sends: &[u64], interval_ns: u64, out: &mut Vec<i64>) {
    if let Some(&t0) = sends.first() {
        for (j, &s) in sends.iter().enumerate().skip(1) {
            out.push(s as i64 - (t0 + j as u64 * interval_ns) as i64);
        }
    }
}

/// Nearest-rank percentile of sorted values (the same definition as bench/clients.py).
pub fn percentile(sorted: &[i64], pct: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `{"p50":..,"p90":..,"p99":..,"p999":..,"max":..,"count":..}` in milliseconds; sorts `values`.
pub fn summary_ms(values: &mut [i64]) -> String {
    values.sort_unstable();
    let ms = |p: f64| match percentile(values, p) {
        Some(v) => format!("{:.4}", v as f64 / 1e6),
        None => "null".to_string(),
    };
    format!(
        "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{},\"count\":{}}}",
        ms(50.0),
        ms(90.0),
        ms(99.0),
        ms(99.9),
        ms(100.0),
        values.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_is_arrival_gap_minus_send_gap_inside_the_window() {
        // The mock sent at 0, 50, 101, 150 ms; the client saw 2, 52, 110, 152 ms.
        let ms = 1_000_000;
        let sends = [0, 50 * ms, 101 * ms, 150 * ms];
        let arrivals = [2 * ms, 52 * ms, 110 * ms, 152 * ms];
        let mut out = Vec::new();
        assert_eq!(added_delays(&arrivals, &sends, 0, u64::MAX, &mut out), 4);
        assert_eq!(out, vec![0, 7 * ms as i64, -7 * ms as i64]);
        out.clear();
        // Only gaps ending in [60, 200] ms count; frame 1 (52 ms) is outside.
        assert_eq!(
            added_delays(&arrivals, &sends, 60 * ms, 200 * ms, &mut out),
            2
        );
        assert_eq!(out, vec![7 * ms as i64, -7 * ms as i64]);
        let mut late = Vec::new();
        lateness(&sends, 50 * ms, &mut late);
        assert_eq!(late, vec![0, ms as i64, 0]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&[], 50.0), None);
        let mut v = vec![3_000_000, 1_000_000, 2_000_000];
        assert!(summary_ms(&mut v).starts_with("{\"p50\":2.0000,"));
    }
}
