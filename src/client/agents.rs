//! The agent service a [`ClientBuilder`](super::ClientBuilder) assembles from its agents, tools,
//! model and worker pool: each is said once, and `build()` registers the agents and tools,
//! builds the [`Kernel`] on the client's database and instance, and installs the
//! [`AgentRuntime`] on the worker pool (the agents' queues plus the user's own queues and
//! handlers), which the client starts and drains as a service.

use std::sync::Arc;
use std::time::Duration;

use crate::agent::{AgentDef, AgentRuntime, Tool, ToolRegistry, agent_queue};
use crate::agent::{register_agent, register_tools};
use crate::config::ClientConfig;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::model::ModelPort;
use crate::queue::{WorkerPool, WorkerPoolBuilder};

/// What the builder collected for the agent service.
#[derive(Default)]
pub(super) struct AgentService {
    pub(super) agents: Vec<AgentDef>,
    pub(super) tools: Vec<Tool>,
    pub(super) model: Option<Arc<dyn ModelPort>>,
    pub(super) pool: Option<WorkerPoolBuilder>,
    pub(super) run_lease_ttl: Option<Duration>,
}

impl AgentService {
    /// Whether anything was configured (else the client has no worker pool of its own).
    fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.tools.is_empty() && self.pool.is_none()
    }

    /// Check the parts and record the agents and tools in the configuration (the instance's
    /// `pgcrew.instance_agents` / `instance_tools` links): before connecting, so a mistake
    /// costs no connection.
    pub(super) fn prepare(&self, config: &mut ClientConfig) -> Result<Option<ToolRegistry>> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut registry = ToolRegistry::new();
        for t in &self.tools {
            registry.register(t.clone())?;
        }
        if !self.agents.is_empty() && self.model.is_none() {
            return Err(Error::Config(
                "an agent service needs a model: add .model(Arc<dyn ModelPort>) to the client builder"
                    .into(),
            ));
        }
        for def in &self.agents {
            def.validate()?;
            if self.agents.iter().filter(|d| d.name == def.name).count() > 1 {
                return Err(Error::Config(format!(
                    "agent {} is added twice to the client builder",
                    def.name
                )));
            }
            if let Some(missing) = def.tools.iter().find(|t| registry.get(t).is_none()) {
                return Err(Error::Config(format!(
                    "agent {} uses tool {missing}, which is not added to the client builder (.tool(..))",
                    def.name
                )));
            }
            push_unique(&mut config.agents, &def.name);
        }
        for name in registry.names() {
            push_unique(&mut config.tools, &name);
        }
        Ok(Some(registry))
    }

    /// Register the agents and tools on `db` and build the worker pool: the user's pool (or a
    /// new one working only the agents' queues) with the agent-run handler installed; no pool
    /// when there is neither an agent nor a user's pool.
    pub(super) async fn install(
        self,
        db: &Db,
        config: &ClientConfig,
        tools: ToolRegistry,
    ) -> Result<Option<Arc<WorkerPool>>> {
        for def in &self.agents {
            register_agent(db, def).await?;
        }
        register_tools(db, &tools).await?;
        let mut builder = match self.pool {
            Some(b) => b,
            None if self.agents.is_empty() => return Ok(None),
            None => {
                let mut b = WorkerPool::builder();
                for def in &self.agents {
                    b = b.queue(agent_queue(&def.name));
                }
                b
            }
        };
        if let Some(model) = self.model.filter(|_| !self.agents.is_empty()) {
            let id = config.instance_id.clone();
            let kernel = Kernel::new(db.clone(), model)
                .with_tools(tools)
                .with_instance(id.clone());
            let mut runtime = AgentRuntime::new(kernel, id.as_str()).with_instance(id);
            if let Some(ttl) = self.run_lease_ttl {
                runtime = runtime.lease_ttl(ttl);
            }
            let names: Vec<&str> = self.agents.iter().map(|d| d.name.as_str()).collect();
            builder = runtime.install(builder, &names);
        }
        builder.build().map(Some)
    }
}

fn push_unique(list: &mut Vec<String>, name: &str) {
    if !list.iter().any(|n| n == name) {
        list.push(name.to_string());
    }
}
