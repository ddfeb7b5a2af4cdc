//! Agents and tools: tool definitions with JSON input schemas ([`Tool`], [`ToolRegistry`]), a
//! small JSON Schema validator for tool arguments ([`schema`]), and agent definitions with the
//! durable agent loop.

pub mod schema;
pub mod tool;

pub use tool::{Tool, ToolBuilder, ToolContext, ToolError, ToolRegistry, validate_tool_name};
