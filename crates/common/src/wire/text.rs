//! Text from the network, on its way to a log or a terminal.

/// `text` with its control characters escaped (a newline as `\n`, an escape as `\u{1b}`), for
/// text from the network on its way to a log or a terminal, such as a peer's reason for closing
/// a connection or a proxy's answer: it can then neither forge a log line nor move a
/// terminal's cursor.
pub fn printable(text: &str) -> String {
    text.chars()
        .fold(String::with_capacity(text.len()), |mut out, c| {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            printable("bye\nINFO forged \x1b[2J\u{9b}é"),
            "bye\\nINFO forged \\u{1b}[2J\\u{9b}é"
        );
    }
}
