//! What the benchmark binaries share: reading the numbers on their
//! command lines.

/// The number that follows option `name` among `args`, 0 included.
pub fn number(args: &mut impl Iterator<Item = String>, name: &str) -> Result<usize, String> {
    let value = args
        .next()
        .ok_or_else(|| format!("{name} needs a number"))?;
    value
        .parse::<usize>()
        .map_err(|_| format!("{name} needs a number, not {value:?}"))
}

/// The positive number that follows option `name` among `args`.
pub fn positive_number(
    args: &mut impl Iterator<Item = String>,
    name: &str,
) -> Result<usize, String> {
    let value = args
        .next()
        .ok_or_else(|| format!("{name} needs a number"))?;
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{name} needs a positive number, not {value:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> std::vec::IntoIter<String> {
        words
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn numbers_are_read_or_refused_with_the_options_name() {
        assert_eq!(number(&mut args(&["0"]), "--warmup"), Ok(0));
        assert_eq!(positive_number(&mut args(&["7"]), "--reps"), Ok(7));
        assert_eq!(
            positive_number(&mut args(&["0"]), "--reps"),
            Err("--reps needs a positive number, not \"0\"".to_owned())
        );
        assert_eq!(
            number(&mut args(&["x"]), "--warmup"),
            Err("--warmup needs a number, not \"x\"".to_owned())
        );
        assert_eq!(
            positive_number(&mut args(&[]), "--reps"),
            Err("--reps needs a number".to_owned())
        );
    }
}
