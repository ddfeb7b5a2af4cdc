//! Token bounds and estimates: what a model step reserves for before a call
//! ([`prompt_token_bound`]) and what it assumes when a provider reports no usage
//! ([`completion_token_bound`]).

use super::message::{Message, ToolCall};
use super::request::ModelRequest;

/// Estimated tokens of `chars` characters of text (~4 characters per token, rounded up).
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// Estimated prompt tokens of a request: its messages, tools and output schema at ~4 characters
/// per token, plus 4 tokens of framing per message.
pub fn estimate_prompt_tokens(request: &ModelRequest) -> u64 {
    let mut chars = 0usize;
    for m in &request.messages {
        chars += m.text().chars().count();
        if let Message::Assistant { tool_calls, .. } = m {
            for c in tool_calls {
                chars += c.name.len() + c.arguments.to_string().chars().count();
            }
        }
    }
    for t in &request.tools {
        chars +=
            t.name.len() + t.description.chars().count() + t.parameters.to_string().chars().count();
    }
    if let Some(s) = &request.output_schema {
        chars += s.name.len() + s.schema.to_string().chars().count();
    }
    estimate_tokens(chars) + 4 * request.messages.len() as u64
}

/// Tokens of chat framing allowed per message in [`prompt_token_bound`] (role markers,
/// separators, a tokenizer's word-start marker; OpenAI documents 3 to 4).
pub const BOUND_TOKENS_PER_MESSAGE: u64 = 8;
/// Tokens of framing allowed per tool definition in [`prompt_token_bound`] (the provider's
/// rendering of a function signature around its JSON schema).
pub const BOUND_TOKENS_PER_TOOL: u64 = 16;
/// Tokens of framing allowed once per request in [`prompt_token_bound`] (reply priming, the
/// wrapper of the tool list and of a structured-output schema).
pub const BOUND_TOKENS_PER_REQUEST: u64 = 16;

/// A conservative upper bound on the prompt tokens of a request, for any script: one token per
/// UTF-8 **byte** of every text the provider tokenizes (message texts, tool-call names,
/// arguments and ids, tool names, descriptions and JSON schemas, the output schema), plus
/// [`BOUND_TOKENS_PER_MESSAGE`] per message, [`BOUND_TOKENS_PER_TOOL`] per tool and
/// [`BOUND_TOKENS_PER_REQUEST`].
///
/// Why bytes: byte-level BPE tokenizers (GPT-3.5/4/4o, o-series, Llama 3, Qwen, ...) never make
/// a token smaller than one byte, and SentencePiece tokenizers with byte fallback (Llama 2,
/// Mistral, Gemma) never make one smaller than one byte either, apart from a word-start marker
/// covered by the per-message framing. So this holds for Latin, CJK, emoji, Arabic or any other
/// text, where a characters-based estimate (~4 characters per token) can undercount tenfold
/// (one CJK character is 3 bytes and often 1 to 3 tokens; one emoji is 4 or more bytes and up
/// to 4 or more tokens). For English it overestimates about fourfold; the difference is only
/// reserved, never charged (settlement charges the provider's reported usage).
pub fn prompt_token_bound(request: &ModelRequest) -> u64 {
    let mut bytes = 0u64;
    let mut add = |s: &str| bytes = bytes.saturating_add(s.len() as u64);
    for m in &request.messages {
        add(m.role());
        add(m.text());
        match m {
            Message::Assistant { tool_calls, .. } => {
                for c in tool_calls {
                    add(&c.id);
                    add(&c.name);
                    add(&c.arguments.to_string());
                }
            }
            Message::Tool { tool_call_id, .. } => add(tool_call_id),
            Message::System { .. } | Message::User { .. } => {}
        }
    }
    for t in &request.tools {
        add(&t.name);
        add(&t.description);
        add(&t.parameters.to_string());
    }
    if let Some(s) = &request.output_schema {
        add(&s.name);
        add(&s.schema.to_string());
    }
    let framing = BOUND_TOKENS_PER_REQUEST
        .saturating_add(BOUND_TOKENS_PER_MESSAGE.saturating_mul(request.messages.len() as u64))
        .saturating_add(BOUND_TOKENS_PER_TOOL.saturating_mul(request.tools.len() as u64));
    bytes.saturating_add(framing)
}

/// A conservative upper bound on the completion tokens of an answer whose usage the provider
/// did not report: one token per UTF-8 byte of the text and of the tool calls (names and JSON
/// arguments) plus [`BOUND_TOKENS_PER_MESSAGE`], and never more than the cap `max_tokens` when
/// one was sent.
pub fn completion_token_bound(
    content: Option<&str>,
    tool_calls: &[ToolCall],
    max_tokens: Option<u32>,
) -> u64 {
    let mut bytes = content.map_or(0, |c| c.len() as u64);
    for c in tool_calls {
        bytes = bytes
            .saturating_add(c.name.len() as u64)
            .saturating_add(c.arguments.to_string().len() as u64);
    }
    let bound = bytes.saturating_add(BOUND_TOKENS_PER_MESSAGE);
    match max_tokens {
        Some(cap) => bound.min(u64::from(cap)),
        None => bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::request::tests::base;

    #[test]
    fn prompt_token_bound_counts_bytes_of_every_script() {
        let latin = ModelRequest::new("m").user("hello world");
        let cjk = ModelRequest::new("m").user("预算保证在边缘也成立");
        let emoji = ModelRequest::new("m").user("🤖💸👩‍💻");
        let arabic = ModelRequest::new("m").user("الميزانية");
        let framing = BOUND_TOKENS_PER_REQUEST + BOUND_TOKENS_PER_MESSAGE + "user".len() as u64;
        for (r, text) in [
            (&latin, "hello world"),
            (&cjk, "预算保证在边缘也成立"),
            (&emoji, "🤖💸👩‍💻"),
            (&arabic, "الميزانية"),
        ] {
            assert_eq!(prompt_token_bound(r), text.len() as u64 + framing, "{text}");
            // Never below the characters-based estimate.
            assert!(prompt_token_bound(r) >= estimate_prompt_tokens(r), "{text}");
        }
        // 10 CJK characters are 30 bytes: the old estimate said 3 tokens.
        assert_eq!(estimate_tokens("预算保证在边缘也成立".chars().count()), 3);
        // Tools and schemas count too.
        assert!(
            prompt_token_bound(&base())
                > prompt_token_bound(&ModelRequest::new("m").user("what is 2+2?"))
        );
        assert_eq!(
            completion_token_bound(Some("预算"), &[], None),
            6 + BOUND_TOKENS_PER_MESSAGE
        );
        assert_eq!(completion_token_bound(Some("预算"), &[], Some(3)), 3);
    }
}
